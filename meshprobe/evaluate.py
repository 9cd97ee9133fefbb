"""The one loss path: mean next-token cross-entropy, used by training, validation, `meshprobe eval`, the zoo's
shared-sample loss and the analysis lens.

    loss = compute_loss(model, x, y)                    # a training step's loss (x, y from get_batch)
    val_loss, n = evaluate(model, val_tokens, batch_size, seq_len, max_batches, device)
    result = evaluate_checkpoint("checkpoints/tiny")    # `meshprobe eval`

The cross-entropy is always computed in fp32: from the logits (:func:`token_loss`), or, for the training loss of a
meshprobe model without autocast, from the final hidden state in cache-sized chunks (:mod:`meshprobe.loss`, the
same number). The model's own ``forward(return_type="loss")`` (TransformerLens's convention) computes it for a
token tensor.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from meshprobe.checks import check_fits
from meshprobe.errors import UserError
from meshprobe.runtime import all_reduce_, autocast_for, resolve_device


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32) of logits [..., vocab] against targets [...] (flattened over all leading dims)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)


def unwrapped(model):
    """The module inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def compute_loss(model, x, y):
    """Mean cross-entropy (fp32) of model(x) against targets y: next-token targets for text; for a task
    (:mod:`meshprobe.data.tasks`) the targets sit at their own positions (no shift) and are -100 where undefined,
    which cross_entropy ignores, so the mean is over the defined targets only. A meshprobe model (also inside
    DDP / torch.compile, called through the wrapper) computes it itself: `forward(x, "loss", targets=y)`,
    without building the logits unless autocast is on (:mod:`meshprobe.loss`)."""
    from meshprobe.model import MeshprobeModel

    if isinstance(unwrapped(model), MeshprobeModel):
        return model(x, return_type="loss", targets=y)
    return token_loss(model(x), y)


def ppl(loss: float) -> float:
    """Perplexity exp(loss) (inf past float range)."""
    return math.exp(loss) if loss < 700 else float("inf")


def evaluate(model, tokens, batch_size: int, seq_len: int, max_batches: int, device, precision: str = "auto",
             rank: int = 0, world_size: int = 1, chunk: int | None = None) -> tuple[float, int]:
    """(mean loss, tokens) over the first `max_batches` validation batches (:func:`meshprobe.data.eval_batches`).

    The windows evaluated depend only on (batch_size, seq_len, max_batches): under DDP every rank takes a
    contiguous share of each batch's rows (sums all-reduced), and `chunk` caps the rows per forward pass.
    """
    from meshprobe.data import eval_batches

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
            rows = np.array_split(np.arange(len(x)), world_size)[rank]
            step = chunk or max(1, len(rows))
            for a in range(0, len(rows), step):
                xb = torch.from_numpy(x[rows[a:a + step]]).to(device)
                yb = torch.from_numpy(y[rows[a:a + step]]).to(device)
                with autocast_for(device, precision):
                    logits = model(xb)
                total[0] += token_loss(logits, yb, reduction="sum").double()
                total[1] += yb.numel()
    all_reduce_(total, world_size)
    model.train(was_training)
    loss_sum, count = total.tolist()
    return (loss_sum / count if count else float("nan")), int(count)


def evaluate_task(model, spec, n_sequences: int, device, precision: str = "auto", rank: int = 0,
                  world_size: int = 1, chunk: int | None = None, seed: int = 0) -> dict:
    """Loss and task accuracy of `model` on the fixed evaluation set of a task (:func:`meshprobe.data.tasks.eval_set`,
    `n_sequences` sequences from evaluation seed `seed`, the same symbols at every hop count).

    Returns ``{"val_loss", "task_acc", "task_acc_by_hops", "targets"}``: the loss (mean over defined targets)
    and accuracy (argmax over the first v logits) at the evaluated hop count ``spec.hops``, the accuracy at
    every trained hop count ({p: acc}), and the number of scored targets at ``spec.hops``. Under DDP every rank
    takes a share of the rows and the sums are all-reduced."""
    from meshprobe.data import tasks

    was_training = model.training
    model.eval()
    hops = spec.train_hops
    sums = torch.zeros(2 + 2 * len(hops), dtype=torch.float64, device=device)  # loss, count, (correct, scored)*
    with torch.no_grad():
        for k, p in enumerate(hops):
            batch = tasks.eval_set(spec, n_sequences, seed=seed, hops=p)
            rows = np.array_split(np.arange(n_sequences), world_size)[rank]
            step = chunk or max(1, len(rows))
            for a in range(0, len(rows), step):
                xb = torch.from_numpy(batch.tokens[rows[a:a + step]]).to(device)
                yb = torch.from_numpy(batch.targets[rows[a:a + step]]).to(device)
                with autocast_for(device, precision):
                    logits = model(xb)
                correct, scored = tasks.task_correct(logits, yb, spec.symbols)
                sums[2 + 2 * k] += correct
                sums[3 + 2 * k] += scored
                if p == spec.hops:
                    sums[0] += token_loss(logits, yb, reduction="sum").double()
                    sums[1] += scored
    all_reduce_(sums, world_size)
    model.train(was_training)
    v = sums.tolist()
    acc = {p: (v[2 + 2 * k] / v[3 + 2 * k] if v[3 + 2 * k] else float("nan")) for k, p in enumerate(hops)}
    return {"val_loss": v[0] / v[1] if v[1] else float("nan"), "task_acc": acc[spec.hops],
            "task_acc_by_hops": {str(p): a for p, a in acc.items()}, "targets": int(v[1])}


def sample_loss(model, tokens: np.ndarray, batch_size: int = 50) -> float:
    """Mean next-token loss of `model` over a token array [N, seq] (every position but the last predicts the
    next token; every sequence weighs the same), on the model's device."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            x = torch.from_numpy(tokens[i:i + batch_size].astype("int64")).to(device)
            total += token_loss(model(x)[:, :-1], x[:, 1:]).item() * x.numel()
            count += x.numel()
    return total / count


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UserError(f"{name}={value}: must be at least 1")


def evaluate_checkpoint(path: str | os.PathLike, data_spec: str | Sequence[str] | None = None,
                        batches: int | None = None, batch_size: int | None = None, seq_len: int | None = None,
                        device: str = "auto", split: str = "val", loops: int | None = None) -> dict:
    """Validation loss and perplexity of a checkpoint with its own tokenizer.

    loops: run a looped model with this many loop steps (test-time depth, :func:`load_checkpoint`); the result's
    "loops" is the K it ran with (None for vanilla / block layouts).

    Without ``data_spec``, a checkpoint that ships its validation sample (``val_tokens.npy``: bundled checkpoints
    do) is evaluated on it, so it needs no corpus. Otherwise defaults come from the checkpoint's train metadata:
    the corpus (`data`), seq_len, batch_size and eval_batches (falling back to n_ctx, 16 and 50). Returns dict(checkpoint, data, split, loss, ppl, tokens,
    batches, batch_size, seq_len, step). A task checkpoint (metadata "task") is evaluated on its task
    (:func:`task_checkpoint_eval`).
    """
    from meshprobe import data
    from meshprobe.checkpoint import VAL_TOKENS_FILE, check_loops, load_checkpoint, read_checkpoint_config
    from meshprobe.data.tokenizer import load_tokenizer

    config = read_checkpoint_config(path)
    meta = config.get("metadata", {}) or {}
    tcfg = meta.get("train", {}) or {}
    if loops is not None:
        check_loops(path, [loops])
    if meta.get("task") is not None:
        return task_checkpoint_eval(path, meta, data_spec, batches, batch_size, device, split, loops)
    own = Path(path) / VAL_TOKENS_FILE
    if not data_spec and split == "val" and own.is_file():
        return _own_sample_eval(path, own, config, batches, batch_size, seq_len, device, loops)
    tokenizer = load_tokenizer(path, missing_ok=True)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.json; cannot tokenize evaluation text")
    spec = data_spec if data_spec else tcfg.get("data", "shakespeare")
    n_ctx = config["model"]["n_ctx"]
    seq_len = seq_len if seq_len is not None else (tcfg.get("seq_len") or n_ctx)
    batch_size = batch_size if batch_size is not None else (tcfg.get("batch_size") or 16)
    batches = batches if batches is not None else (tcfg.get("eval_batches") or 50)
    _check_positive(batches=batches, batch_size=batch_size, seq_len=seq_len)
    if seq_len > n_ctx:
        raise UserError(f"seq_len {seq_len} is above the model context n_ctx={n_ctx}")
    check_fits(2 * 8 * batch_size * seq_len, f"a batch of {batch_size} x {seq_len} tokens (batch_size)")
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, not {split!r}")
    dev = resolve_device(device)
    if tokenizer.get_vocab_size() > config["model"]["vocab_size"]:
        raise UserError(f"{path}: tokenizer larger than the model vocabulary")
    corpus = data.open_corpus(spec)
    tokens = data.tokenize_corpus(corpus, tokenizer)[split]
    if len(tokens) < seq_len + 1:
        raise UserError(f"data {corpus.name}: only {len(tokens)} {split} tokens, need at least {seq_len + 1}")
    model = load_checkpoint(path, device=dev, loops=loops)
    loss, n = evaluate(model, tokens, batch_size, seq_len, batches, dev, "auto")
    return {"checkpoint": str(path), "data": spec, "split": split, "loss": loss, "ppl": ppl(loss), "tokens": n,
            "batches": min(batches, math.ceil(((len(tokens) - 1) // seq_len) / batch_size)),
            "batch_size": batch_size, "seq_len": seq_len, "step": meta.get("step"), "loops": _loops_of(model)}


def _own_sample_eval(path, own: Path, config: dict, batches, batch_size, seq_len, device: str, loops) -> dict:
    """`meshprobe eval` without a corpus of a checkpoint that ships its validation sample (``val_tokens.npy``):
    the loss over its first ``batches * batch_size`` rows (default all), first ``seq_len`` tokens of each."""
    from meshprobe.checkpoint import VAL_TOKENS_FILE, load_checkpoint

    try:
        arr = np.load(own, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{own}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.shape[1] < 2:
        raise UserError(f"{own}: need a 2-d integer array [N, seq], got {arr.dtype} {arr.shape}")
    batch_size = batch_size if batch_size is not None else 16
    batches = batches if batches is not None else math.ceil(len(arr) / batch_size)
    seq_len = seq_len if seq_len is not None else arr.shape[1]
    _check_positive(batches=batches, batch_size=batch_size, seq_len=seq_len)
    if seq_len > min(arr.shape[1], config["model"]["n_ctx"]):
        raise UserError(f"seq_len={seq_len} is above the sample's {arr.shape[1]} tokens or the model context")
    if int(arr.max()) >= config["model"]["vocab_size"]:
        raise UserError(f"{own}: token ids beyond the model vocabulary")
    rows = arr[:batches * batch_size, :seq_len]
    model = load_checkpoint(path, device=resolve_device(device), loops=loops)
    loss = sample_loss(model, rows, batch_size)
    meta = config.get("metadata", {}) or {}
    return {"checkpoint": str(path), "data": f"its own validation sample ({VAL_TOKENS_FILE})", "split": "val",
            "loss": loss, "ppl": ppl(loss), "tokens": int(rows.size), "batches": math.ceil(len(rows) / batch_size),
            "batch_size": batch_size, "seq_len": seq_len, "step": meta.get("step"), "loops": _loops_of(model)}


def _loops_of(model) -> int | None:
    """The loop steps a looped model runs (None for vanilla and unshared block layouts)."""
    return model.cfg.n_loops if model.cfg.shared else None


def task_checkpoint_eval(path, meta: dict, data_spec, batches, batch_size, device: str, split: str,
                        loops: int | None = None) -> dict:
    """`meshprobe eval` of a task checkpoint: loss (over defined targets) and task accuracy at the evaluated hop
    count on ``batches * batch_size`` sequences of the fixed evaluation set (seed 0, as in training)."""
    from meshprobe.data import tasks
    from meshprobe.checkpoint import load_checkpoint

    spec = tasks.task_from_entry(meta["task"])
    if data_spec is not None and data_spec != spec.spec_string():
        if not tasks.is_task_spec(data_spec) or tasks.parse_task(data_spec) != spec:
            raise UserError(f"{path} was trained on {spec.spec_string()}; it can only be evaluated on that task")
    if split != "val":
        raise UserError("a task has no train split to evaluate: sequences are generated (use --split val)")
    tcfg = meta.get("train", {}) or {}
    batch_size = batch_size if batch_size is not None else (tcfg.get("batch_size") or 32)
    batches = batches if batches is not None else (tcfg.get("eval_batches") or 16)
    _check_positive(batches=batches, batch_size=batch_size)
    check_fits(8 * 4 * batches * batch_size * spec.n_ctx, f"{batches} x {batch_size} task sequences")
    dev = resolve_device(device)
    model = load_checkpoint(path, device=dev, loops=loops)
    res = evaluate_task(model, spec, batches * batch_size, dev, chunk=256)
    return {"checkpoint": str(path), "data": spec.spec_string(), "split": split, "loss": res["val_loss"],
            "ppl": ppl(res["val_loss"]), "tokens": res["targets"], "batches": batches, "batch_size": batch_size,
            "seq_len": spec.n_ctx, "step": meta.get("step"), "task_acc": res["task_acc"],
            "task_acc_by_hops": res["task_acc_by_hops"], "loops": _loops_of(model)}
