"""Training on a synthetic task (``--data task:...``, :mod:`meshprobe.data.tasks`) instead of text.

What changes against text (everything else -- recipe, schedule, progress, resume, errors -- is the same loop):

* no corpus and no tokenizer: token id = symbol id (hop-count prefix tokens after the symbols); the model's
  ``vocab_size`` and ``n_ctx`` must hold the task (checked before anything is written);
* the batch at step s is :func:`meshprobe.data.tasks.train_batch` (a pure function of seed and step, so resume
  and DDP work as for text); targets sit at their own positions (no shift) and are -100 where undefined;
  the loss is the mean cross-entropy over the defined targets (per micro-batch, then averaged);
* evaluation (:func:`meshprobe.evaluate.evaluate_task`) runs on a fixed set of ``eval_batches * batch_size``
  sequences (evaluation seed 0, the same for every run) and logs ``task_acc`` (accuracy at the evaluated hop
  count p, argmax over the first v logits) beside ``val_loss``, plus ``task_acc_by_hops``;
* ``stop_acc`` stops the run at the first evaluation with ``task_acc >= stop_acc`` (status "solved");
* config.json metadata gets ``"task": TaskSpec.entry()`` -- ``{"name", "hops", "symbols", "seq_len",
  "prefix", "train_hops"}`` -- and ``data = {"spec", "task"}``.
"""
from __future__ import annotations

from meshprobe.data import tasks
from meshprobe.errors import UserError


def setup_task(run) -> None:
    """Parse and check the task of ``run.cfg.data``; set run.task and run.data_meta (nothing is written)."""
    spec = tasks.parse_task(run.cfg.data)
    mc = run.model_cfg
    if mc.vocab_size < spec.vocab_size:
        raise UserError(f"{spec.spec_string()} needs vocab_size >= {spec.vocab_size} (symbols + hop-count tokens); "
                        f"the model has {mc.vocab_size} (set --vocab-size {spec.vocab_size})")
    if mc.n_ctx < spec.n_ctx:
        raise UserError(f"{spec.spec_string()} needs n_ctx >= {spec.n_ctx} (prefix + {spec.seq_len} symbols); "
                        f"the model has {mc.n_ctx} (set --n-ctx {spec.n_ctx})")
    run.task = spec
    run.data_meta = {"spec": spec.spec_string(), "task": spec.entry()}


def step_batch(run):
    """(tokens, targets) numpy int64 [B/W, n_ctx] of this rank at run.step."""
    b = tasks.train_batch(run.task, run.cfg.batch_size, run.step, run.cfg.seed, run.rank, run.world)
    return b.tokens, b.targets


def eval_task(run) -> tuple[float, dict]:
    """(val_loss, {"task_acc", "task_acc_by_hops"}) for the evaluation record
    (see :func:`meshprobe.evaluate.evaluate_task`)."""
    from meshprobe.evaluate import evaluate_task

    cfg = run.cfg
    res = evaluate_task(run.model, run.task, cfg.eval_batches * cfg.batch_size, run.device, run.precision,
                        run.rank, run.world, chunk=run.micro)
    return res["val_loss"], {"task_acc": res["task_acc"], "task_acc_by_hops": res["task_acc_by_hops"]}


def solved_message(run, wall: float) -> str:
    return (f"meshprobe train: solved at step {run.step} (task acc {run.last_val['task_acc']:.4f} >= stop_acc "
            f"{run.cfg.stop_acc}), {wall:.1f} s; checkpoint {run.out_dir}")


def solved(run) -> bool:
    """The last evaluation reached stop_acc."""
    acc = run.last_val.get("task_acc")
    return run.cfg.stop_acc is not None and acc is not None and acc >= run.cfg.stop_acc


def describe(run) -> str:
    """The data part of the start banner."""
    return f"task {run.task.spec_string()} (vocab {run.task.vocab_size}, {run.task.n_ctx} tokens per sequence)"

