"""Reproducing the paper: the checkpoint zoo (`zoo`), the bundled figures and tables (`figures`), and the task
part of them (`task_figures`). Everything here is built on the library below it (models, training, analysis);
nothing below imports it."""
