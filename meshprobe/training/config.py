"""TrainConfig (the ``[train]`` table of a preset) and the learning-rate schedule.

Recipe (paper §4): AdamW (beta1 0.9, beta2 0.95, eps 1e-8), weight decay 0.01, cosine schedule with 1% linear
warm-up decaying to 10% of the peak learning rate, gradient clipping at global norm 1.0; bf16 autocast on
CUDA, fp32 on CPU. Schedule choices the paper leaves open are in :func:`lr_at`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meshprobe.errors import UserError
from meshprobe.runtime import PRECISIONS


@dataclass
class TrainConfig:
    """The ``[train]`` section of a preset. Every field can be overridden on the command line (``--lr 1e-3``).

    data            corpus spec (:mod:`meshprobe.data`): "shakespeare", "mix", a source name, or a list of paths;
                    or a synthetic task (:mod:`meshprobe.data.tasks`), e.g. "task:phop:hops=2,symbols=8,seq_len=32,mix=1":
                    no tokenizer, targets masked where undefined, and seq_len is set to the task's prefix + n
    seed            seeds the model init and the batch stream (batch at step s = f(seed, s))
    batch_size      GLOBAL batch in sequences (split evenly over processes under torchrun)
    micro_batch_size  sequences per forward/backward on one process (gradient accumulation); None = all of
                    the process' rows at once. Must divide batch_size / world_size.
    seq_len         tokens per sequence (at most the model's n_ctx)
    steps / tokens  run length: optimizer steps, or training tokens (steps = ceil(tokens / (batch * seq_len)));
                    set one (neither: steps = 1000). A command-line override of one clears the other.
    lr              peak learning rate
    warmup_frac     share of the steps with linear warm-up (ceil)
    min_lr_frac     final learning rate as a share of the peak
    weight_decay    AdamW decoupled weight decay on matrices (see the module docstring)
    betas, eps      AdamW moments ("0.9,0.95" on the command line)
    grad_clip       clip the global gradient norm to this (0 = off)
    eval_every      validation every N steps (0 = only at the end); also always at the end
    eval_batches    validation batches per evaluation (0 = no validation at all)
    log_every       a log record (and progress line) every N steps
    save_every      a checkpoint every N steps (0 = only at step 0, on stop and at the end)
    keep_every      keep a light snapshot (weights + config.json, no optimizer state) at step 0 and every N
                    steps in ``<out_dir>.snapshots/step-NNNNNN`` beside the checkpoint, so analyses can follow a
                    run over training (:func:`meshprobe.training.state.snapshot_paths` lists them); 0 = none
    compile         torch.compile the model
    device          "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    precision       "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    tokenizer       reuse this tokenizer (a tokenizer.json or a checkpoint directory) instead of training one
    stop_after      stop after this many steps of the full schedule (checkpoint saved; resume continues).
                    Not carried over by --resume.
    stop_acc        task data only: stop (status "solved", checkpoint saved) at the first evaluation whose task
                    accuracy at the evaluated hop count is >= this; a resumed run that already reached it does
                    nothing more (None = train the whole budget)
    """

    data: str | list[str] = "shakespeare"
    seed: int = 0
    batch_size: int = 32
    micro_batch_size: int | None = None
    seq_len: int = 128
    steps: int | None = None
    tokens: int | None = None
    lr: float = 1e-3
    warmup_frac: float = 0.01
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 0
    keep_every: int = 0
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"
    tokenizer: str | None = None
    stop_after: int | None = None
    stop_acc: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple)):
            self.data = [str(d) for d in self.data]
            if not self.data:
                raise UserError("data is empty: give a corpus name (shakespeare, mix, ...) or paths")
            if len(self.data) == 1:
                self.data = self.data[0]
        elif not isinstance(self.data, str) or not self.data.strip():
            raise UserError(f"data must be a corpus name or a list of paths, got {self.data!r}")
        try:
            self.betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise UserError(f"betas must be two numbers like 0.9,0.95, got {self.betas!r}") from None
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self._check_task()
        if self.steps is None and self.tokens is None:
            self.steps = 1000
        if self.steps is not None and self.tokens is not None:
            raise UserError(f"set steps or tokens, not both (steps={self.steps}, tokens={self.tokens})")
        positive = ["batch_size", "seq_len", "log_every"]
        positive += [n for n in ("steps", "tokens", "micro_batch_size", "stop_after") if getattr(self, n) is not None]
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "eval_every", "eval_batches", "save_every", "keep_every"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("lr", "eps"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise UserError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("warmup_frac", "min_lr_frac"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise UserError(f"compile must be true or false, got {self.compile!r}")
        if self.stop_after is not None and self.stop_after > self.total_steps:
            raise UserError(f"stop_after {self.stop_after} is beyond the run's {self.total_steps} steps")

    def _check_task(self) -> None:
        """A task fixes the sequence length; stop_acc needs a task."""
        from meshprobe.data.tasks import is_task_spec, parse_task

        if is_task_spec(self.data):
            self.seq_len = parse_task(self.data).n_ctx
        elif self.stop_acc is not None:
            raise UserError("stop_acc needs task data (--data task:...): text has no task accuracy")
        if self.stop_acc is not None and (not _is_number(self.stop_acc) or not 0.0 < self.stop_acc <= 1.0):
            raise UserError(f"stop_acc must be in (0, 1], got {self.stop_acc!r}")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the length the learning-rate schedule is laid over)."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"unknown train config key(s) {unknown}; known keys: {', '.join(known)}")
        return cls(**data)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def lr_at(step: int, total_steps: int, lr: float, warmup_frac: float = 0.01, min_lr_frac: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps`.

    ``warmup = ceil(warmup_frac * total)`` steps rise linearly ``lr * (step + 1) / warmup``; then a half cosine
    goes from ``lr`` at the first decay step to exactly ``min_lr_frac * lr`` at the last step. The total is
    always the run's full length (``steps`` or ``ceil(tokens / (batch_size * seq_len))``), never the point
    where a run stops, so an interrupted run resumes on the same curve."""
    warmup = math.ceil(warmup_frac * total_steps) if warmup_frac > 0 else 0
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = total_steps - warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps - 1))
    min_lr = min_lr_frac * lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
