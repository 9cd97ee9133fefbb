"""Crosscoder sources read from a model: the loop states h^(0..K) (optionally h_emb and h_out) and, for MeSH,
the memory slots, streamed through a shuffle buffer so that memory stays flat in the number of tokens.

    spec = source_spec(model)                       # names, hooks, kinds of the sources
    rows = iter_rows(model, tokens, spec)           # (acts [n, S, d], where [n, 2] = (sequence, position))
    batches = shuffled(rows, buffer_rows=16384)     # random batches of rows, a fixed-size buffer

State names and hooks come from :mod:`meshprobe.hooks` (h^(0) = ``loop.0.hook_state_in``, h^(t+1) =
``loop.{t}.hook_state_out``), for meshprobe checkpoints and wrapped transformers looped LMs alike. The MeSH
slots are those of the buffer after the last write (``loop.{K-1}.mesh.hook_memory``, one source per slot):
everything the loop ever wrote, as the coda could read it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from meshprobe.errors import UserError
from meshprobe.features.checks import _no_loop, source_names
from meshprobe.hooks import mesh_steps, recursive_state_hooks

__all__ = ["SourceSpec", "source_spec", "iter_rows", "shuffled", "model_batches"]


@dataclass
class SourceSpec:
    """The sources of one model: ``names[s]`` read from hook ``hooks[s]`` (slot ``slots[s]`` of a memory
    hook [b, B, seq, d], else None); ``kinds[s]`` is "emb", "loop", "out" or "slot"."""

    names: list[str]
    hooks: list[str]
    slots: list[int | None]
    kinds: list[str]
    n_loops: int

    @property
    def loop_names(self) -> list[str]:
        return [n for n, k in zip(self.names, self.kinds) if k == "loop"]

    def to_dict(self) -> dict:
        return {"names": self.names, "hooks": self.hooks, "slots": self.slots, "kinds": self.kinds,
                "n_loops": self.n_loops}


def source_spec(model, emb: bool = False, out: bool = False, slots: bool = True) -> SourceSpec:
    """The sources of a looped model (a meshprobe model or a wrapped transformers one, or a meshprobe
    ``ModelConfig``): h^(0) ... h^(K), with ``emb`` h_emb first, with ``out`` h_out after them, with ``slots``
    the MeSH memory slots last."""
    cfg = getattr(model, "cfg", model)
    K = 0 if getattr(cfg, "is_vanilla", False) else int(getattr(cfg, "n_loops", 0) or 0)
    if K < 1:
        raise _no_loop(getattr(cfg, "layout", "?"))
    steps = [] if getattr(cfg, "is_hf", False) else mesh_steps(cfg)
    names, kinds = source_names(K, int(cfg.mesh_slots or 0) if steps else 0, emb, out, slots)
    state_hook = dict(recursive_state_hooks(K))
    memory = f"{steps[-1][1]}.hook_memory" if steps else None
    rows = [(n, memory if k == "slot" else state_hook[n], int(n.split()[1]) - 1 if k == "slot" else None, k)
            for n, k in zip(names, kinds)]
    missing = sorted({h for _, h, _, _ in rows} - set(getattr(model, "hook_dict", None) or
                                                      {h for _, h, _, _ in rows}))
    if missing:
        raise UserError(f"the model has no hooks {missing[:3]}: not a looped model meshprobe can read")
    names, hooks, slot_ids, kinds = (list(c) for c in zip(*rows))
    return SourceSpec(names, hooks, slot_ids, kinds, K)


def _stack(cache: dict, spec: SourceSpec, skip_first: int) -> torch.Tensor:
    """[b, seq, S, d] of one batch's cache (positions before ``skip_first`` dropped)."""
    parts = [cache[h][:, slot] if slot is not None else cache[h] for h, slot in zip(spec.hooks, spec.slots)]
    return torch.stack(parts, dim=2)[:, skip_first:]


def iter_rows(model, tokens: torch.Tensor, spec: SourceSpec, batch_size: int = 8, skip_first: int = 1,
              device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(acts [n, S, d], where [n, 2])`` for consecutive batches of ``tokens`` [N, seq]: one row per token
    position (``where`` = sequence index, position). The first ``skip_first`` positions are dropped: the first
    token's states are outliers (no context, attention sink) that a dictionary would spend features on."""
    from meshprobe.analysis.pipeline.collect import iter_caches

    if not 0 <= skip_first < tokens.shape[1]:
        raise UserError(f"skip_first={skip_first} must be in [0, seq_len={tokens.shape[1]})")
    hooks = list(dict.fromkeys(spec.hooks))
    for start, tok, cache, _ in iter_caches(model, tokens, hooks, batch_size=batch_size, device=device):
        acts = _stack(cache, spec, skip_first).cpu()
        b, L = acts.shape[:2]
        seq = torch.arange(start, start + b)[:, None].expand(b, L)
        pos = torch.arange(skip_first, skip_first + L)[None, :].expand(b, L)
        yield acts.reshape(b * L, *acts.shape[2:]), torch.stack([seq, pos], -1).reshape(b * L, 2)


def model_batches(model, tokens: torch.Tensor, spec: SourceSpec, *, epochs: int = 1, batch_size: int = 1024,
                  buffer_rows: int = 16384, seed: int = 0, skip_first: int = 1, model_batch: int = 8,
                  device=None) -> Iterator[torch.Tensor]:
    """Training batches [batch_size, S, d] for ``epochs`` passes over ``tokens``: each pass runs the model
    again (nothing is kept between passes) and goes through a shuffle buffer of ``buffer_rows`` rows."""
    for epoch in range(epochs):
        rows = (acts for acts, _ in iter_rows(model, tokens, spec, model_batch, skip_first, device))
        yield from shuffled(rows, buffer_rows, batch_size, seed=seed * 1000 + epoch)


def shuffled(chunks: Iterable[torch.Tensor], buffer_rows: int = 16384, batch_size: int = 1024,
             seed: int = 0) -> Iterator[torch.Tensor]:
    """Random batches of rows from a stream of chunks [n, ...]: rows enter a buffer of ``buffer_rows`` rows;
    once it is full, every batch is drawn at random from it and its places are refilled from the stream; at
    the end the rest comes out shuffled. Each row comes out exactly once; memory is the buffer plus one chunk,
    whatever the length of the stream."""
    if buffer_rows < batch_size or batch_size < 1:
        raise UserError(f"buffer_rows={buffer_rows} must be at least batch_size={batch_size} (>= 1)")
    g = torch.Generator().manual_seed(seed)
    buf, filled, pending = None, 0, None
    for chunk in chunks:
        pending = chunk if pending is None else torch.cat([pending, chunk])  # pending: < batch_size rows
        if buf is None:
            buf = torch.empty(buffer_rows, *chunk.shape[1:], dtype=chunk.dtype)
        at = min(buffer_rows - filled, pending.shape[0])  # filling up
        buf[filled:filled + at] = pending[:at]
        filled += at
        while filled == buffer_rows and pending.shape[0] - at >= batch_size:
            idx = torch.randperm(buffer_rows, generator=g)[:batch_size]
            out = buf[idx].clone()
            buf[idx] = pending[at:at + batch_size]
            at += batch_size
            yield out
        pending = pending[at:]
    if buf is not None:
        rest = torch.cat([buf[:filled], pending])
        rest = rest[torch.randperm(rest.shape[0], generator=g)]
        for start in range(0, rest.shape[0], batch_size):
            yield rest[start:start + batch_size]
