"""Test-time depth: a trained looped model run with K loop steps (``load_checkpoint(path, loops=K)``), K other
than the trained one, on text and on a ground-truth task. Plain functions that take a checkpoint path and
return JSON-ready dicts; the figure is in :mod:`meshprobe.analysis.plots.depth`.

* :func:`text_depth` -- for each K: the next-token loss of the model run with K loop steps on a token sample,
  and the per-state lens: the loss of the final LayerNorm + unembedding read straight from every state h^(0),
  ..., h^(K) (no coda; ``model.readout``). The lens through the coda is not reported separately: the coda read
  of h^(t) is exactly the output of the model run with K = t, i.e. the loss curve itself.
* :func:`task_depth` -- for each K: task accuracy at every hop count p the model was trained on, asked with
  that p's hop-count token, and at p = P + 1 (P the largest trained count): a model trained on p <= P has no
  token for P + 1, so it is asked for P hops and scored against hop_{P+1} -- "does running more loop steps carry
  the chain one hop further?" (with ``mix`` off there is no hop-count token and only p = P is scored).

K beyond the trained K is left out (``None``) for variants with per-step parameters (MeSH routers, comb
scalars: :meth:`meshprobe.config.ModelConfig.with_loops`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from meshprobe.data import tasks
from meshprobe.hooks import recursive_state_hooks

DEFAULT_LOOPS = (1, 2, 3, 4, 5, 6)


def _runnable(path, loops: Sequence[int]) -> tuple[dict, list[int]]:
    """(checkpoint config, the loop counts of `loops` the checkpoint can run)."""
    from meshprobe.checkpoint import read_checkpoint_config
    from meshprobe.config import ModelConfig
    from meshprobe.errors import UserError

    config = read_checkpoint_config(path)
    cfg = ModelConfig.from_dict(config["model"])
    ok = []
    for k in loops:
        try:
            cfg.with_loops(k)
            ok.append(k)
        except UserError:
            pass
    return config, ok


def _trained_loops(config: dict) -> int:
    from meshprobe.config import parse_layout

    return len(parse_layout(config["model"]["layout"])[1])


@torch.no_grad()
def _text_at(model, tokens: np.ndarray, batch_size: int) -> tuple[float, list[float]]:
    """(next-token loss, [lens loss of h^(0..K)]) of `model` on tokens [N, seq]."""
    from meshprobe.evaluate import token_loss

    named = recursive_state_hooks(model.cfg.n_loops)[1:-1]  # h^(0) .. h^(K)
    wanted = {hook for _, hook in named}
    loss, lens, count = 0.0, np.zeros(len(named)), 0
    for a in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[a:a + batch_size].astype("int64"))
        logits, cache = model.run_with_cache(x, names_filter=lambda n: n in wanted)
        n = x[:, 1:].numel()
        loss += token_loss(logits[:, :-1], x[:, 1:]).item() * n
        for i, (_, hook) in enumerate(named):
            lens[i] += token_loss(model.readout(cache[hook])[:, :-1], x[:, 1:]).item() * n
        count += n
    return loss / count, (lens / count).tolist()


def text_depth(path: str | os.PathLike, tokens: np.ndarray, loops: Sequence[int] = DEFAULT_LOOPS,
               batch_size: int = 50) -> dict:
    """Loss and per-state lens of the checkpoint at `path` run with each K of `loops` on tokens [N, seq]:
    ``{"trained_loops", "variant", "loops", "loss": [per K or None], "lens": [[h^(0..K)] per K or None]}``."""
    from meshprobe.checkpoint import load_checkpoint

    config, ok = _runnable(path, loops)
    out = {"trained_loops": _trained_loops(config), "variant": config["model"]["variant"], "loops": list(loops), "loss": [],
           "lens": []}
    for k in loops:
        if k not in ok:
            out["loss"].append(None)
            out["lens"].append(None)
            continue
        model = load_checkpoint(path, loops=k)
        loss, lens = _text_at(model, tokens, batch_size)
        out["loss"].append(loss)
        out["lens"].append(lens)
    return out


def hop_batches(spec: tasks.TaskSpec, n_sequences: int, seed: int) -> dict[str, tasks.TaskBatch]:
    """{"p": batch} for every trained hop count p (asked with its token) and, when the task has hop-count
    tokens, "P+1" (asked for P = spec.hops, targets hop_{P+1}); the same symbols in every batch."""
    out = {str(p): tasks.eval_set(spec, n_sequences, seed=seed, hops=p) for p in spec.train_hops}
    if spec.mix:
        ask = out[str(spec.hops)]
        deeper = tasks.TASKS[spec.name](ask.symbols, spec.hops + 1, spec.symbols)[:, spec.hops]
        targets = np.full_like(ask.targets, tasks.IGNORE)
        targets[:, ask.offset:] = np.where(deeper >= 0, deeper, tasks.IGNORE)
        out[str(spec.hops + 1)] = tasks.TaskBatch(ask.tokens, targets, ask.latents, ask.hops, ask.offset)
    return out


def hop_p_answer(batches: dict[str, tasks.TaskBatch], spec: tasks.TaskSpec) -> dict[str, float]:
    """{p: accuracy of answering hop_q, q the hop count asked for} -- 1 where p is asked for; for p = P + 1
    the level a model that keeps answering hop_P scores (hop_P = hop_{P+1} there), the level to read it against."""
    out = {}
    for p, batch in batches.items():
        q = min(int(p), spec.hops)
        mask = batch.targets >= 0
        out[p] = float((batch.latents[:, q - 1] == batch.targets)[mask].mean()) if mask.any() else float("nan")
    return out


def task_depth(path: str | os.PathLike, loops: Sequence[int] = DEFAULT_LOOPS, n_sequences: int = 512,
               seed: int = 1) -> dict:
    """Task accuracy of the task checkpoint at `path` run with each K of `loops`, per hop count (module
    docstring), on `n_sequences` evaluation sequences of evaluation seed `seed`: ``{"trained_loops", "variant",
    "task", "loops", "acc": {p: [per K or None]}, "asked": {p: hop count asked for}}``."""
    from meshprobe.checkpoint import load_checkpoint

    config, ok = _runnable(path, loops)
    spec = tasks.task_from_entry(config["metadata"]["task"])
    batches = hop_batches(spec, n_sequences, seed)
    acc = {p: [] for p in batches}
    for k in loops:
        model = load_checkpoint(path, loops=k) if k in ok else None
        for p, batch in batches.items():
            if model is None:
                acc[p].append(None)
                continue
            with torch.no_grad():
                logits = model(torch.from_numpy(batch.tokens))
            acc[p].append(tasks.task_accuracy(logits, batch.targets, spec.symbols))
    return {"trained_loops": _trained_loops(config), "variant": config["model"]["variant"],
            "task": spec.entry(), "loops": list(loops), "acc": acc, "hop_p_answer": hop_p_answer(batches, spec),
            "asked": {p: min(int(p), spec.hops) for p in batches}, "n_sequences": n_sequences, "seed": seed}
