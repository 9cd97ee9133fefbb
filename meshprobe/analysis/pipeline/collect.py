"""Read the states of a model through its public hooks, one token batch at a time.

Which tensors an analysis reads is described by a :class:`StateSpec` (built from the model config by
:func:`state_spec`); :func:`iter_caches` runs ``model.run_with_cache`` on batches ``[b, seq]`` of a token tensor
with ``names_filter`` restricted to those hooks (nothing else is kept) and yields one float32 dict per batch.
Nothing is accumulated here: the caller folds each batch into streaming statistics and drops it.

States
------
* Recursive models (every variant with a prelude / loop / coda, including unshared block layouts such as
  ``4+8+8+4``): the paper's sequence ``h_emb, h^(0), ..., h^(K), h_out`` read from ``hook_embed``,
  ``loop.0.hook_state_in``, ``loop.{t}.hook_state_out`` and ``coda.hook_out`` (:func:`meshprobe.hooks.states`).
  Blocks for the relative update: ``prelude`` = (``hook_embed`` -> ``prelude.hook_out``), ``loop t+1`` =
  (``loop.{t}.hook_state_in`` -> ``loop.{t}.hook_core_out``, i.e. f_core(h^(t)) before any residual / anchor /
  MeSH mixing), ``coda`` = (``loop.{K-1}.hook_state_out`` -> ``coda.hook_out``).
* Vanilla models have no loop: their states are ``h_emb`` and the residual stream after every layer
  (``blocks.{u}.hook_resid_post``), named ``layer 1`` ... ``layer L-1`` and ``h_out`` for the last one; the
  blocks are the single layers ``layer 1`` ... ``layer L`` (input = the previous state). CKA, spectra and the
  lens are computed the same way, so vanilla models can be compared with recursive ones.
* MeSH models add the router weights and the buffer after every write: ``entry.mesh.*`` and
  ``loop.{t}.mesh.*`` (steps ``entry``, ``loop 1`` ... ``loop K``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from meshprobe.errors import UserError
from meshprobe.hooks import MESH_HOOKS, mesh_steps, recursive_state_hooks, state_hooks

__all__ = ["StateSpec", "state_spec", "iter_caches"]


@dataclass
class StateSpec:
    """What to read from one model (all names are hook names of ``model.hook_dict``).

    kind          "recursive" or "vanilla"
    states        [(state name, hook)] in forward order (h_emb ... h_out)
    blocks        [(block name, input hook, output hook)] for the relative update r(f, h)
    loop_states   state names h^(1) ... h^(K) (features of the loop-index probe, label t for h^(t+1))
    core_steps    [(t, hook of h^(t), hook of f_core(h^(t)))] (update features of the loop-index probe)
    lens_coda     state names that are also decoded through the coda (h^(0) ... h^(K)); empty for vanilla
    mesh_steps    [(step name, hook prefix)] e.g. ("entry", "entry.mesh"), ("loop 1", "loop.0.mesh"); empty
                  for non-MeSH models
    n_slots       MeSH buffer size B (0 for non-MeSH models)
    """

    kind: str
    states: list[tuple[str, str]]
    blocks: list[tuple[str, str, str]]
    loop_states: list[str] = field(default_factory=list)
    core_steps: list[tuple[int, str, str]] = field(default_factory=list)
    lens_coda: list[str] = field(default_factory=list)
    mesh_steps: list[tuple[str, str]] = field(default_factory=list)
    n_slots: int = 0

    @property
    def state_names(self) -> list[str]:
        return [s for s, _ in self.states]

    @property
    def block_names(self) -> list[str]:
        return [b for b, _, _ in self.blocks]

    @property
    def is_mesh(self) -> bool:
        return bool(self.mesh_steps)

    @property
    def final_memory_hook(self) -> str | None:
        """The buffer after the last write (``loop.{K-1}.mesh.hook_memory``), probed slot by slot."""
        return f"{self.mesh_steps[-1][1]}.hook_memory" if self.mesh_steps else None

    def hook_names(self) -> list[str]:
        """Every hook the analyses read (the ``names_filter`` of ``run_with_cache``), without duplicates."""
        names: list[str] = [h for _, h in self.states]
        names += [h for _, a, b in self.blocks for h in (a, b)]
        names += [h for _, a, b in self.core_steps for h in (a, b)]
        for _, prefix in self.mesh_steps:
            names += [f"{prefix}.{m}" for m in MESH_HOOKS]
        return list(dict.fromkeys(names))


def state_spec(model_or_cfg) -> StateSpec:
    """The :class:`StateSpec` of a model (or its ``ModelConfig``); state names come from
    :func:`meshprobe.hooks.state_hooks`, see the module docstring for the blocks."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if getattr(cfg, "is_hf", False):
        return _hf_state_spec(cfg.n_loops)
    states = state_hooks(cfg)
    hooks = [h for _, h in states]
    if cfg.is_vanilla:
        blocks = [(f"layer {u + 1}", hooks[u], hooks[u + 1]) for u in range(cfg.unrolled_depth)]
        return StateSpec("vanilla", states, blocks)
    K = cfg.n_loops
    core = [(t, f"loop.{t}.hook_state_in", f"loop.{t}.hook_core_out") for t in range(K)]
    blocks = [("prelude", "hook_embed", "prelude.hook_out")]
    blocks += [(f"loop {t + 1}", a, b) for t, a, b in core]
    blocks += [("coda", f"loop.{K - 1}.hook_state_out", "coda.hook_out")]
    steps = mesh_steps(cfg)
    return StateSpec(
        kind="recursive", states=states, blocks=blocks,
        loop_states=[name for name, _ in states[2:-1]], core_steps=core,
        lens_coda=[name for name, _ in states[1:-1]], mesh_steps=steps,
        n_slots=int(cfg.mesh_slots or 0) if steps else 0,
    )


def _hf_state_spec(K: int) -> StateSpec:
    """A wrapped transformers looped LM (:mod:`meshprobe.hf`): the same states; each loop block is the step's
    input h^(t) -> its output h^(t+1) (there is no separate f_core hook); prelude = h_emb -> h^(0), coda =
    h^(K) -> h_out; no coda lens (the coda is not run on its own)."""
    states = recursive_state_hooks(K)
    core = [(t, f"loop.{t}.hook_state_in", f"loop.{t}.hook_state_out") for t in range(K)]
    blocks = [("prelude", "hook_embed", "loop.0.hook_state_in")] + [(f"loop {t + 1}", a, b) for t, a, b in core]
    blocks += [("coda", f"loop.{K - 1}.hook_state_out", "coda.hook_out")]
    return StateSpec(kind="recursive", states=states, blocks=blocks, loop_states=[n for n, _ in states[2:-1]],
                     core_steps=core)


def check_tokens(tokens: torch.Tensor, cfg) -> torch.Tensor:
    """Validate a token tensor [N, seq] against a model config (UserError on bad input); returns it as int64."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise UserError(f"tokens must be a 2-d array [samples, seq_len], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise UserError(f"tokens must be integers, got {tokens.dtype}")
    n, seq = tokens.shape
    if n < 2:
        raise UserError(f"need at least 2 samples, got {n}")
    if seq < 4:
        raise UserError(f"seq_len must be at least 4 tokens, got {seq}")
    if seq > cfg.n_ctx:
        raise UserError(f"seq_len {seq} is above the model context n_ctx={cfg.n_ctx}")
    tokens = tokens.long()
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise UserError(f"token ids must lie in [0, {cfg.vocab_size}) for this model, found [{lo}, {hi}]")
    return tokens


def iter_caches(model, tokens: torch.Tensor, names: list[str], batch_size: int = 8,
                device: torch.device | str | None = None
                ) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """Yield ``(start, tokens_batch, cache, logits)`` for consecutive batches of ``tokens`` [N, seq].

    ``cache`` maps every name in ``names`` to a float32 tensor on ``device`` (only those hooks are cached; a
    model in bfloat16 / float16, or spread over devices by accelerate, gives the same float32 tensors);
    ``logits`` [b, seq, vocab] are float32. Runs under ``torch.no_grad``; on CUDA the forward runs in the
    model's own dtype (no autocast), so the numbers match the CPU path up to kernel differences.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    wanted = set(names)
    missing = sorted(wanted - set(model.hook_dict))
    if missing:
        raise KeyError(f"model has no hooks {missing[:5]}")
    for start in range(0, tokens.shape[0], batch_size):
        tok = tokens[start:start + batch_size].to(device)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tok, names_filter=lambda name: name in wanted)
            out = {k: cache[k].to(device=device, dtype=torch.float32) for k in names}  # a spread model's
        yield start, tok, out, logits.to(device=device, dtype=torch.float32)  # states come from several devices
        del cache, out, logits
