"""Synthetic ground-truth tasks: multi-step problems whose intermediate results (latents) are known.

No tokenizer: token id = symbol id (0 .. v-1); any prefix tokens come after the symbols (v, v+1, ...), so the
model's logit j scores symbol j for j < v. Every generator is a pure function of its seed.

Tasks (positions are 0-based here; the definitions are usually written 1-based, which changes nothing below):

``phop``    p-hop induction (Sanford et al. 2024; Saunshi et al. 2025). x_0 .. x_{n-1} i.i.d. uniform in 0..v-1;
            prev(i) = max{j < i : x_j = x_i} (undefined if none); step(i) = prev(i) + 1; hop_t(i) = x_{step^t(i)}.
            hop_t(i) is undefined as soon as any prev on the chain is. Since prev(i) < i, step(i) <= i: the
            chain never moves right, and when x_{i-1} = x_i, step(i) = i and the chain stays put (hop_t(i) = x_i
            for every later t) -- the definition taken literally. Target: hop_p(i); latent t: hop_t(i).
``modsum``  windowed modular sum (a running sum over the last p symbols): latent t at i is
            (x_i + x_{i-1} + ... + x_{i-t+1}) mod v, defined for i >= t-1; the target is latent p. Each hop adds
            one more earlier symbol, so latent t is the partial sum after t terms.

Mixed hop counts (``mix``): training draws p per sequence uniformly from {1, ..., hops} and puts ONE hop-count
token before the symbols, token id ``v + p - 1`` ("answer with p hops"). Evaluation is at p = hops, so the
prefix that asks for the evaluated task is ``[v + hops - 1]`` (``TaskSpec.prefix``); without ``mix`` there is
no prefix and every sequence uses p = hops. Prefix positions have no target and no latents.

Spec strings (``--data``): ``task:NAME`` or ``task:NAME:key=value,key=value``, keys ``hops`` (p, default 2),
``symbols`` (v, default 8), ``seq_len`` (n, default 32), ``mix`` (0/1, default 0). Example:
``task:phop:hops=2,symbols=8,seq_len=32,mix=1``. A checkpoint records ``TaskSpec.entry()``:
``{"name": "phop", "hops": 2, "symbols": 8, "seq_len": 32, "prefix": [9], "train_hops": [1, 2]}``.

Shapes: a :class:`TaskBatch` holds ``tokens`` [B, L], ``targets`` [B, L] (IGNORE = -100 where undefined, the
default ``ignore_index`` of ``F.cross_entropy``), ``latents`` [B, hops, L] (-1 where undefined) and ``hops`` [B],
with L = len(prefix) + n and column ``offset + i`` holding symbol i. Arrays are int64 numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from meshprobe.checks import check_fits
from meshprobe.config import MAX_LAYERS, MAX_SIZES
from meshprobe.errors import UserError

IGNORE = -100  # target where the answer is undefined (cross_entropy's default ignore_index)
UNDEFINED = -1  # latent where it is undefined
SPEC_PREFIX = "task:"
EVAL_SALT = 0x7A5C  # keeps evaluation sequences on their own random stream, apart from training batches


# ------------------------------------------------------------------------------------------------- latents
def prev_occurrence(x: np.ndarray, symbols: int) -> np.ndarray:
    """prev[b, i] = max{j < i : x[b, j] = x[b, i]}, or -1 when x[b, i] has not occurred before. x: [B, n]."""
    x = np.asarray(x, dtype=np.int64)
    batch, n = x.shape
    last = np.full((batch, symbols), -1, dtype=np.int64)
    prev = np.empty((batch, n), dtype=np.int64)
    rows = np.arange(batch)
    for i in range(n):  # vectorized over the batch; O(n) numpy calls
        prev[:, i] = last[rows, x[:, i]]
        last[rows, x[:, i]] = i
    return prev


def phop_latents(x: np.ndarray, hops: int, symbols: int) -> np.ndarray:
    """hop_t(i) for t = 1..hops: [B, hops, n] int64, -1 where undefined (see the module docstring)."""
    x = np.asarray(x, dtype=np.int64)
    prev = prev_occurrence(x, symbols)
    step = np.where(prev >= 0, prev + 1, -1)
    pos = np.broadcast_to(np.arange(x.shape[1]), x.shape).copy()
    out = np.empty((x.shape[0], hops, x.shape[1]), dtype=np.int64)
    for t in range(hops):
        nxt = np.take_along_axis(step, np.maximum(pos, 0), axis=1)
        pos = np.where(pos >= 0, nxt, -1)
        out[:, t] = np.where(pos >= 0, np.take_along_axis(x, np.maximum(pos, 0), axis=1), UNDEFINED)
    return out


def modsum_latents(x: np.ndarray, hops: int, symbols: int) -> np.ndarray:
    """(x_i + ... + x_{i-t+1}) mod v for t = 1..hops: [B, hops, n] int64, -1 where i < t-1."""
    x = np.asarray(x, dtype=np.int64)
    batch, n = x.shape
    out = np.full((batch, hops, n), UNDEFINED, dtype=np.int64)
    acc = np.zeros_like(x)
    for t in range(hops):
        acc[:, t:] = (acc[:, t:] + x[:, :n - t]) % symbols
        out[:, t, t:] = acc[:, t:]
    return out


TASKS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {"phop": phop_latents, "modsum": modsum_latents}


# ---------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class TaskSpec:
    """One task: name (a key of TASKS), hops p (evaluated at), symbols v, seq_len n, mix (see module doc)."""

    name: str = "phop"
    hops: int = 2
    symbols: int = 8
    seq_len: int = 32
    mix: bool = False

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise UserError(f"unknown task {self.name!r}: use one of {', '.join(sorted(TASKS))}")
        for key, low, high in (("hops", 1, MAX_LAYERS), ("symbols", 2, MAX_SIZES["vocab_size"]),
                               ("seq_len", 2, MAX_SIZES["n_ctx"])):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"task {self.name}: {key} must be an integer >= {low}, got {value!r}")
            if value > high:  # a model could not hold it (vocab_size, n_ctx, loop limits), nor memory the arrays
                raise UserError(f"task {self.name}: {key} = {value} is above the supported maximum {high}")
        if not isinstance(self.mix, bool):
            raise UserError(f"task {self.name}: mix must be true or false, got {self.mix!r}")

    @property
    def train_hops(self) -> list[int]:
        """The hop counts drawn in training."""
        return list(range(1, self.hops + 1)) if self.mix else [self.hops]

    def prefix_for(self, hops: int) -> list[int]:
        """Token ids put before the symbols to ask for `hops` hops ([] without mix)."""
        if hops not in range(1, self.hops + 1) or (not self.mix and hops != self.hops):
            raise UserError(f"task {self.name}: cannot ask for {hops} hops (trained on {self.train_hops})")
        return [self.symbols + hops - 1] if self.mix else []

    @property
    def prefix(self) -> list[int]:
        """The prefix of the evaluated task (p = hops)."""
        return self.prefix_for(self.hops)

    @property
    def vocab_size(self) -> int:
        """Smallest model vocabulary: the symbols plus the hop-count tokens."""
        return self.symbols + (self.hops if self.mix else 0)

    @property
    def n_ctx(self) -> int:
        """Tokens per sequence (prefix + symbols): the smallest model n_ctx."""
        return len(self.prefix) + self.seq_len

    def batch_bytes(self, n: int) -> int:
        """A lower estimate of the memory of `n` generated sequences: int64 tokens, targets and latents, and the
        per-sequence symbol table the phop latents use."""
        return 8 * n * (self.n_ctx * (self.hops + 3) + self.symbols)

    def entry(self) -> dict:
        """The checkpoint config.json "task" entry."""
        return {"name": self.name, "hops": self.hops, "symbols": self.symbols, "seq_len": self.seq_len,
                "prefix": self.prefix, "train_hops": self.train_hops}

    def spec_string(self) -> str:
        return (f"{SPEC_PREFIX}{self.name}:hops={self.hops},symbols={self.symbols},seq_len={self.seq_len},"
                f"mix={int(self.mix)}")


def is_task_spec(spec) -> bool:
    return isinstance(spec, str) and spec.strip().startswith(SPEC_PREFIX)


def parse_task(spec: str) -> TaskSpec:
    """``task:phop`` or ``task:phop:hops=2,symbols=8,seq_len=32,mix=1`` -> TaskSpec (UserError if malformed)."""
    text = str(spec).strip()
    if not text.startswith(SPEC_PREFIX):
        raise UserError(f"task spec {spec!r} must start with {SPEC_PREFIX!r}, e.g. 'task:phop:hops=2'")
    name, _, params = text[len(SPEC_PREFIX):].partition(":")
    kwargs: dict = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in ("hops", "symbols", "seq_len", "mix"):
            raise UserError(f"task spec {spec!r}: bad parameter {item!r}; use hops=, symbols=, seq_len=, mix= "
                            "(e.g. 'task:phop:hops=2,symbols=8,seq_len=32,mix=1')")
        if key in kwargs:
            raise UserError(f"task spec {spec!r}: {key} given twice")
        if key == "mix":
            if value.lower() not in ("0", "1", "true", "false"):
                raise UserError(f"task spec {spec!r}: mix must be 0 or 1, got {value!r}")
            kwargs[key] = value.lower() in ("1", "true")
        else:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise UserError(f"task spec {spec!r}: {key} must be an integer, got {value!r}") from None
    return TaskSpec(name=name.strip(), **kwargs)


def task_from_entry(entry: dict) -> TaskSpec:
    """Inverse of TaskSpec.entry() (mix is read from train_hops, else from a non-empty prefix)."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise UserError(f"task entry must be an object with a name, got {entry!r}")
    hops = entry.get("hops", 2)
    mix = len(entry.get("train_hops", [hops])) > 1 or bool(entry.get("prefix"))
    spec = TaskSpec(name=entry["name"], hops=hops, symbols=entry.get("symbols", 8),
                    seq_len=entry.get("seq_len", 32), mix=mix)
    if "prefix" in entry and list(entry["prefix"]) != spec.prefix:
        raise UserError(f"task entry prefix {entry['prefix']} does not match {spec.prefix} for {spec.spec_string()}")
    return spec


# ----------------------------------------------------------------------------------------------- batches
@dataclass
class TaskBatch:
    """tokens/targets [B, L], latents [B, hops, L], hops [B]; symbol i sits at column offset + i."""

    tokens: np.ndarray
    targets: np.ndarray
    latents: np.ndarray
    hops: np.ndarray
    offset: int

    @property
    def symbols(self) -> np.ndarray:
        """The symbols x without the prefix: [B, n]."""
        return self.tokens[:, self.offset:]


def make_batch(spec: TaskSpec, x: np.ndarray, hops: np.ndarray) -> TaskBatch:
    """Assemble a batch from symbols x [B, n] and per-sequence hop counts [B] (each in spec.train_hops)."""
    x = np.asarray(x, dtype=np.int64)
    hops = np.asarray(hops, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != spec.seq_len or hops.shape != (x.shape[0],):
        raise UserError(f"symbols must be [batch, {spec.seq_len}] with one hop count per row")
    if x.size and (x.min() < 0 or x.max() >= spec.symbols):
        raise UserError(f"symbols must lie in 0..{spec.symbols - 1}")
    if not np.isin(hops, spec.train_hops).all():
        raise UserError(f"hop counts must be in {spec.train_hops}")
    lat = TASKS[spec.name](x, spec.hops, spec.symbols)
    rows = np.arange(x.shape[0])
    targets = lat[rows, hops - 1]
    targets = np.where(targets >= 0, targets, IGNORE)
    offset = len(spec.prefix)
    if offset:
        pre = (spec.symbols + hops - 1)[:, None]
        x = np.concatenate([pre, x], axis=1)
        targets = np.concatenate([np.full((len(rows), offset), IGNORE), targets], axis=1)
        lat = np.concatenate([np.full((len(rows), spec.hops, offset), UNDEFINED), lat], axis=2)
    return TaskBatch(tokens=x, targets=targets.astype(np.int64), latents=lat, hops=hops, offset=offset)


def generate(spec: TaskSpec, batch_size: int, rng: np.random.Generator, hops: int | None = None) -> TaskBatch:
    """`batch_size` fresh sequences from `rng`: symbols first, then (if hops is None) per-sequence hop counts
    drawn uniformly from spec.train_hops; a given `hops` fixes p for every sequence. Sizes that cannot fit in
    memory are a UserError before anything is allocated."""
    check_fits(spec.batch_bytes(batch_size), f"{batch_size} sequences of {spec.spec_string()}")
    x = rng.integers(0, spec.symbols, size=(batch_size, spec.seq_len), dtype=np.int64)
    if hops is None:
        per_seq = rng.choice(np.asarray(spec.train_hops, dtype=np.int64), size=batch_size)
    else:
        spec.prefix_for(hops)  # validates hops
        per_seq = np.full(batch_size, hops, dtype=np.int64)
    return make_batch(spec, x, per_seq)


def train_batch(spec: TaskSpec, batch_size: int, step: int, seed: int, rank: int = 0,
                world_size: int = 1) -> TaskBatch:
    """This rank's rows of the global training batch at `step`: a pure function of (spec, seed, step), like
    :func:`meshprobe.data.get_batch` (rank r takes rows [r B/W, (r+1) B/W), so W ranks see the 1-process batch)."""
    if batch_size < 1 or world_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
        raise UserError(f"bad batch split: batch_size {batch_size}, rank {rank}, world_size {world_size}")
    if step < 0 or seed < 0:
        raise UserError(f"step and seed must be non-negative (got {step}, {seed})")
    full = generate(spec, batch_size, np.random.default_rng([int(seed), int(step)]))
    per = batch_size // world_size
    sl = slice(rank * per, (rank + 1) * per)
    return TaskBatch(full.tokens[sl], full.targets[sl], full.latents[sl], full.hops[sl], full.offset)


def batches(spec: TaskSpec, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[TaskBatch]:
    """Endless training batches from `start_step` on (resuming at step s gives the same batches)."""
    step = start_step
    while True:
        yield train_batch(spec, batch_size, step, seed)
        step += 1


def eval_set(spec: TaskSpec, n: int, seed: int = 0, hops: int | None = None) -> TaskBatch:
    """A fixed evaluation set of `n` sequences at `hops` hops (default spec.hops, the evaluated task), drawn from
    a stream apart from the training batches. The symbols do not depend on `hops`."""
    if n < 1 or seed < 0:
        raise UserError(f"eval set size must be positive and seed non-negative (got {n}, {seed})")
    return generate(spec, n, np.random.default_rng([int(seed), EVAL_SALT, 0]), hops=spec.hops if hops is None
                    else hops)


# -------------------------------------------------------------------------------------------------- score
def task_correct(logits, targets, symbols: int) -> tuple[int, int]:
    """(correct, scored): argmax over the first `symbols` logits against targets, at positions with target >= 0.
    logits [..., V] (torch or numpy), targets [...] int (IGNORE / any negative = not scored)."""
    import torch

    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, device=logits.device)
    if logits.shape[:-1] != targets.shape or logits.shape[-1] < symbols:
        raise UserError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} "
                        f"with {symbols} symbols")
    mask = targets >= 0
    pred = logits[..., :symbols].argmax(dim=-1)
    return int((pred == targets)[mask].sum()), int(mask.sum())


def task_accuracy(logits, targets, symbols: int) -> float:
    """Share of defined positions where argmax over the first `symbols` logits is the target (nan if none)."""
    correct, scored = task_correct(logits, targets, symbols)
    return correct / scored if scored else float("nan")


# ------------------------------------------------------------------------------------------ inspection aids
def shortcut_accuracies(batch: TaskBatch) -> dict[str, float]:
    """Accuracy of answering without solving the task, over the defined targets of `batch`: copy the current
    symbol ("x_i"), answer the latent after t hops ("hop_t"), or always the most frequent target ("majority").
    A plateau at one of these marks a shortcut (for phop with v=8, n=32, p=2, copying x_i scores about 0.45)."""
    mask = batch.targets >= 0
    if not mask.any():
        return {}
    out = {"x_i": float((batch.tokens == batch.targets)[mask].mean())}
    for t in range(batch.latents.shape[1]):
        out[f"hop_{t + 1}"] = float((batch.latents[:, t] == batch.targets)[mask].mean())
    out["majority"] = float(np.bincount(batch.targets[mask]).max() / mask.sum())
    return out


def describe(spec: TaskSpec, n_examples: int = 2, seed: int = 0) -> str:
    """Plain-text view of a task (for `meshprobe data show task:...`): the spec, the checkpoint entry, a few
    evaluation sequences with targets and latents ('.' = undefined / no loss), and the shortcut accuracies."""
    e = eval_set(spec, max(n_examples, 1), seed=seed)
    big = eval_set(spec, 2000, seed=seed)
    width = len(str(spec.vocab_size))

    def row(label, values):
        return f"  {label:>8} " + " ".join("." * width if v < 0 else f"{v:>{width}d}" for v in values)

    lines = [f"{spec.spec_string()}  (vocab {spec.vocab_size}, n_ctx {spec.n_ctx}, trained on hops {spec.train_hops})",
             f"checkpoint entry: {spec.entry()}",
             f"defined targets at p={spec.hops}: {float((big.targets >= 0).mean()):.3f} of positions"]
    for b in range(n_examples):
        lines += [f"example {b}:", row("tokens", e.tokens[b]), row("target", e.targets[b])]
        lines += [row(f"latent {t + 1}", e.latents[b, t]) for t in range(spec.hops)]
    lines.append("shortcut accuracies: " + ", ".join(f"{k} {v:.3f}" for k, v in shortcut_accuracies(big).items()))
    return "\n".join(lines)
