"""The loop map: step t of a looped model as a function of its input state, the rest of the context fixed.

`loop_map(model, tokens, t)` returns `step`, with step(h^(t)) = h^(t+1) on the model's own states, which is
what :func:`meshprobe.dynamics.spectrum` linearises and :mod:`meshprobe.dynamics.trajectory` iterates.

What is held fixed (the context of step t, computed once from `tokens` by the model's own forward):

* meshprobe models: the token embeddings h_emb and the prelude output h^(0) (the anchors the supplement
  adds), and for MeSH the memory buffer as written by the entry cycle and steps 0 .. t-1. Step t's routers
  read the input h (so its write weights, its read weights and its own write h_m = f_core(h) all move with h);
  the earlier writes do not. Base, +residual, +anchor and their sums have no per-step parameters, so their map
  is the same function at every t, also past the trained K (test-time depth); MeSH and the comb variants have
  per-step parameters for their trained K steps only, and unshared layouts one block per step.
* transformers looped models (:mod:`meshprobe.hf`): the model's own forward on `tokens` with the state
  entering step t (``loop.{t}.hook_state_in``) replaced by h, stopped as soon as the state entering step t+1
  exists (its ``hook_state_in``; after the last step, ``loop.{t}.hook_state_out``). So the map includes
  whatever the model injects between steps (Dory's norm + prelude, Huginn's adapter), and everything outside
  the loop is recomputed from `tokens` unchanged. Huginn's random initial state is drawn from a fixed seed.
"""
from __future__ import annotations

import torch

from meshprobe.errors import UserError


def is_hf(model) -> bool:
    return bool(getattr(model.cfg, "is_hf", False))


def max_steps(model) -> int | None:
    """How many loop steps `model` can run: its n_loops when steps have their own parameters (MeSH, comb,
    unshared layouts), None (no limit) for a shared core without per-step parameters and for transformers
    models (rewrap with more loops: :func:`meshprobe.hf.hooked.wrap`)."""
    cfg = model.cfg
    if is_hf(model):
        return None
    if cfg.is_vanilla:
        return 0
    if not cfg.shared or cfg.variant in cfg.PER_STEP_VARIANTS:
        return cfg.n_loops
    return None


def check_step(model, t, what: str = "t") -> None:
    """UserError unless loop step `t` exists for `model` (vanilla models have none)."""
    if getattr(model, "cfg", None) is None:
        raise UserError(f"model must be a meshprobe model or a wrapped transformers looped model "
                        f"(meshprobe.hf), got {type(model).__name__}")
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise UserError(f"{what}= must be a non-negative integer, got {t!r}")
    limit = max_steps(model)
    if limit == 0:
        raise UserError(f"a {model.cfg.variant} model with layout {model.cfg.layout!r} has no loop steps "
                        "(loop dynamics need a looped model)")
    if is_hf(model) and t >= model.cfg.n_loops:
        raise UserError(f"{what}={t}: this {model.cfg.architecture} is wrapped to run {model.cfg.n_loops} loop "
                        f"steps; wrap it with loops > {t} (meshprobe.hf.wrap(..., loops=...))")
    if limit is not None and t >= limit:
        raise UserError(f"{what}={t}: this {model.cfg.variant} model has parameters for its {limit} loop steps "
                        f"only (steps 0..{limit - 1})")


def loop_map(model, tokens: torch.Tensor, t: int):
    """`step(h)` -> the state after loop step t from the state h [b, seq, d] entering it, with the context of
    `tokens` [b, seq] fixed (module docstring: what is held fixed). step(h^(t)) equals the model's h^(t+1)."""
    check_step(model, t)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise UserError(f"tokens must be a tensor [batch, seq], got "
                        f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    return _hf_map(model, tokens, t) if is_hf(model) else _meshprobe_map(model, tokens, t)


# -- meshprobe models -------------------------------------------------------------------------------------
@torch.no_grad()
def context(model, tokens: torch.Tensor, t: int) -> dict:
    """h_emb, h^(0), h^(t) (for t < K) and, for MeSH, the dense buffer before step t's write [b, B, seq, d]."""
    cfg = model.cfg
    mesh = cfg.variant == "mesh"
    t_in = min(t, cfg.n_loops - 1)
    memory_hook = ("entry.mesh.hook_memory" if t == 0 else f"loop.{t - 1}.mesh.hook_memory") if mesh else None
    wanted = {"hook_embed", "loop.0.hook_state_in", f"loop.{t_in}.hook_state_in", memory_hook}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    out = {"h_emb": cache["hook_embed"], "h0": cache["loop.0.hook_state_in"],
           "h_t": cache[f"loop.{t_in}.hook_state_in"] if t < cfg.n_loops else None}
    if mesh:
        out["memory"] = cache[memory_hook]
    return out


def _meshprobe_map(model, tokens, t):
    from meshprobe.model import LayerHooks

    cfg = model.cfg
    ctx = context(model, tokens, t)
    t_param = min(t, cfg.n_loops - 1)  # steps past K (shared core, no per-step parameters) reuse the last step
    step_mod, stack = model.loop[t_param], model.step_weights(t_param)
    idle = [LayerHooks().to(tokens.device) for _ in stack.layers]  # no model hook fires inside the map
    cos, sin = model.rotary_cos, model.rotary_sin

    def step(h: torch.Tensor) -> torch.Tensor:
        h_m = stack(h, cos, sin, idle)
        if cfg.variant != "mesh":
            return model._supplement(step_mod, h_m, h, ctx["h0"], ctx["h_emb"])
        # MeshStep.forward on the dense buffer: write h_m with step t's weights, then read (routers read h)
        w_write, w_read = step_mod.mesh.router_logits(h).softmax(dim=2).unbind(1)  # [b, B, seq] each
        memory = ctx["memory"] + w_write.to(h_m.dtype).unsqueeze(-1) * h_m.unsqueeze(1)
        return (w_read.to(h_m.dtype).unsqueeze(-1) * memory).sum(dim=1)

    step.h_t = ctx["h_t"]  # the model's own h^(t) (None past K): where to start or linearise
    return step


# -- transformers looped models ---------------------------------------------------------------------------
class _Reached(Exception):
    """Raised from a hook when the state after the step exists: the rest of the forward is not needed."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def _hf_map(model, tokens, t):
    K = model.cfg.n_loops
    name_in = f"loop.{t}.hook_state_in"
    name_out = f"loop.{t + 1}.hook_state_in" if t + 1 < K else f"loop.{t}.hook_state_out"

    def stop(value, hook):
        raise _Reached(value)

    def step(h: torch.Tensor) -> torch.Tensor:
        replace = [(name_in, lambda value, hook: h.to(value.dtype)), (name_out, stop)]
        try:
            seeded_run(model, tokens, replace)
        except _Reached as reached:
            return reached.value.to(h.dtype)
        raise UserError(f"loop map: {name_out} did not fire in the forward of {model.cfg.architecture}")

    try:
        with torch.no_grad():
            seeded_run(model, tokens, [(name_in, stop)])
    except _Reached as reached:
        step.h_t = reached.value.float()
    return step


def seeded_run(model, tokens, fwd_hooks) -> None:
    """A transformers model's forward with hooks, torch's RNG seeded (Huginn draws its initial state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=fwd_hooks)
