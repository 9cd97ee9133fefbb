"""Figures from a metrics dict, no torch: the paper's diagnostics (`diagnostics`), the probe figures (`probes`) and
the ground-truth task figure (`tasks`)."""
