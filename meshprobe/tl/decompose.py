"""Residual decompositions of looped models: where TransformerLens's residual-sum assumption holds, and the
exact looped decomposition where it does not.

TransformerLens's `decompose_resid`, `stack_head_results` and `get_full_resid_decomposition` assume that the
input of layer u+1 is the output of layer u, so the residual stream entering layer L is h_emb plus every
earlier attention and MLP output. Over the unrolled depth of a looped model that holds inside every stack,
and across a loop step only for `base` (h^(t+1) = f(h^(t)), and f ends in the residual stream). Every other
state-passing variant mixes states between steps: residual adds h^(t), anchor adds h^(0), anchor_emb adds
h_emb, the comb variants scale the terms, and MeSH replaces the state by a router-weighted read of its
memory slots (also at entry, h^(0) = read of the slots after writing the prelude output). Those unrolled
indices are `residual_breaks(cfg)`; `LoopedActivationCache` (what `model.run_with_cache` returns) refuses
TL's residual-sum helpers past the first break with a one-line `LoopedResidualError` naming the replacements:

    state_parts(cache, t)          h^(t+1) as named parts (core_out, carried, anchor, anchor_emb, or slot{b}
                                   = read weight x slot b) that sum back to loop.{t}.hook_state_out
    decompose_looped(cache, layer) the residual entering unrolled layer `layer` (default: the final h_out)
                                   as TL-labelled components (embed, {u}_attn_out, {u}_mlp_out, or L{u}H{h}
                                   per head) with their exact looped multiplicity; feed it to TL's own
                                   `cache.logit_attrs` / `cache.apply_ln_to_stack`

The looped decomposition is linear in the cached component outputs with per-token coefficients taken from
the cache (router weights, dynamic comb coefficients): like TL's frozen LayerNorm scale, these are held
fixed, so the parts are exact for this forward pass, not a counterfactual.
"""
from __future__ import annotations

import torch

from meshprobe.tl import ActivationCache

Parts = dict[str, torch.Tensor]


class LoopedResidualError(ValueError):
    """A TransformerLens residual-sum helper asked for a layer where a looped model mixes states."""


def residual_breaks(cfg) -> list[int]:
    """Unrolled indices u in 0..n_layers whose input (u = n_layers: the final residual h_out) is NOT the
    previous layer's output (u = 0: not h_emb). Empty for vanilla and base models."""
    if cfg.is_vanilla or cfg.variant == "base":
        return []
    breaks = {cfg.prelude_layers} if cfg.variant == "mesh" else set()
    u = cfg.prelude_layers
    for n in cfg.block_layers:
        u += n
        breaks.add(u)
    return sorted(breaks)


def _first_bad(cfg, lo: int, hi: int) -> int | None:
    return next((b for b in residual_breaks(cfg) if lo <= b <= hi), None)


class LoopedActivationCache(ActivationCache):
    """TransformerLens's ActivationCache for meshprobe models. All methods are TL's own; the residual-sum
    helpers first check that no loop-step mix lies in the layers they sum over (see the module docstring)."""

    def _refuse(self, call: str, layer, bad: int | None, heads: bool = False) -> None:
        if bad is None:
            return
        cfg = self.model.cfg
        where = "the final residual h_out" if bad == cfg.n_layers else f"the input of unrolled layer {bad}"
        raise LoopedResidualError(
            f"cache.{call}(layer={layer}) assumes a plain residual sum, but in this {cfg.variant} looped model "
            f"{where} is a loop-step mix (carried state / anchor / MeSH read), not the previous layer's output; "
            f"use meshprobe.tl.decompose.decompose_looped(cache, layer={layer}{', heads=True' if heads else ''}) "
            "(per step: state_parts(cache, t))")

    def _layer(self, layer) -> int:
        return self.model.cfg.n_layers if layer is None or layer == -1 else layer

    def decompose_resid(self, layer=None, *args, **kwargs):
        self._refuse("decompose_resid", layer, _first_bad(self.model.cfg, 0, self._layer(layer)))
        return super().decompose_resid(layer, *args, **kwargs)

    def get_full_resid_decomposition(self, layer=None, *args, **kwargs):
        self._refuse("get_full_resid_decomposition", layer, _first_bad(self.model.cfg, 0, self._layer(layer)), True)
        return super().get_full_resid_decomposition(layer, *args, **kwargs)

    def _check_stack(self, call: str, layer, apply_ln: bool) -> None:
        # Components of layers < L are summands of resid_post[L-1] unless a mix lies in 1..L-1; the LN scale
        # (apply_ln) and the final residual (L = n_layers) also need the input of L itself to be plain.
        L, n = self._layer(layer), self.model.cfg.n_layers
        self._refuse(call, layer, _first_bad(self.model.cfg, 1, L if (apply_ln or L == n) else L - 1), heads=True)

    def stack_head_results(self, layer=-1, *args, **kwargs):
        apply_ln = args[3] if len(args) > 3 else kwargs.get("apply_ln", False)  # TL's positional order
        self._check_stack("stack_head_results", layer, apply_ln)
        return super().stack_head_results(layer, *args, **kwargs)

    def stack_neuron_results(self, layer, *args, **kwargs):
        apply_ln = args[4] if len(args) > 4 else kwargs.get("apply_ln", False)
        self._check_stack("stack_neuron_results", layer, apply_ln)
        return super().stack_neuron_results(layer, *args, **kwargs)

    def accumulated_resid(self, layer=None, *args, **kwargs):
        if self._layer(layer) == self.model.cfg.n_layers:  # its last entry reads resid_post[n_layers - 1]
            self._refuse("accumulated_resid", layer, _first_bad(self.model.cfg, self._layer(layer), self._layer(layer)))
        return super().accumulated_resid(layer, *args, **kwargs)

    def decompose_looped(self, layer: int | None = None, heads: bool = False):
        """`decompose_looped(self, layer, heads)`: (stack, labels)."""
        return decompose_looped(self, layer, heads=heads)


# ---------------------------------------------------------------------------------------------------------
# One loop step: h^(t+1) as a sum of named parts
# ---------------------------------------------------------------------------------------------------------
def _model(cache, model):
    model = model if model is not None else getattr(cache, "model", None)
    if model is None:
        raise ValueError("pass the model (a plain dict cache does not carry it)")
    return model


def comb_coefficients(cache, model, t: int) -> torch.Tensor:
    """(a1, a2, a3) of step t: [3] for static_comb, [batch, seq, 3] for dynamic_comb (from h^(t))."""
    step = model.loop[t]
    if model.cfg.variant == "static_comb":
        return step.comb.detach()
    with torch.no_grad():
        return step.comb(cache[f"loop.{t}.hook_state_in"])


def state_parts(cache, t: int | str, model=None) -> Parts:
    """h^(t+1) (`loop.{t}.hook_state_out`) as named parts that sum back to it; t="entry" gives a MeSH
    model's h^(0) (`loop.0.hook_state_in`).

      residual / anchor / anchor_emb sums: core_out = f(h^(t)), carried = h^(t), anchor = h^(0), anchor_emb = h_emb
      static / dynamic comb: core_out = a1 f(h^(t)), anchor = a2 h^(0), anchor_emb = a3 h_emb
      mesh: slot{b} = w_read[..., b] m_b for every slot b (m = the memory after this step's write)
      base: core_out only
    """
    model = _model(cache, model)
    cfg = model.cfg
    if cfg.is_vanilla:
        raise ValueError("a vanilla model has no loop steps: its residual is TL's plain sum (cache.decompose_resid)")
    prefix = "entry" if t == "entry" else f"loop.{t}"
    if cfg.variant == "mesh":
        read, memory = cache[f"{prefix}.mesh.hook_read_weights"], cache[f"{prefix}.mesh.hook_memory"]
        return {f"slot{b}": read[..., b : b + 1] * memory[:, b] for b in range(cfg.mesh_slots)}
    if t == "entry":
        raise ValueError(f"only MeSH models mix at entry; in a {cfg.variant} model h^(0) is the prelude output")
    core, h, h0, h_emb = (cache[k] for k in (f"loop.{t}.hook_core_out", f"loop.{t}.hook_state_in",
                                             "loop.0.hook_state_in", "hook_embed"))
    if cfg.variant in ("static_comb", "dynamic_comb"):
        a = comb_coefficients(cache, model, t)
        return {"core_out": a[..., 0:1] * core, "anchor": a[..., 1:2] * h0, "anchor_emb": a[..., 2:3] * h_emb}
    parts = {"core_out": core}
    terms = cfg.supplement_terms
    for name, value in (("carried", h), ("anchor", h0), ("anchor_emb", h_emb)):
        if ("residual" if name == "carried" else name) in terms:
            parts[name] = value
    return parts


# ---------------------------------------------------------------------------------------------------------
# The whole residual: TL-labelled components with their looped multiplicity
# ---------------------------------------------------------------------------------------------------------
def _add(*weighted: tuple[Parts, object]) -> Parts:
    """sum_i coef_i * parts_i, label by label (coef: a number or a tensor broadcasting to [batch, seq, d])."""
    out: Parts = {}
    for parts, coef in weighted:
        for label, value in parts.items():
            term = value if isinstance(coef, (int, float)) and coef == 1 else coef * value
            out[label] = out[label] + term if label in out else term
    return out


def _layer_parts(cache, model, u: int, heads: bool) -> Parts:
    if not heads:
        return {f"{u}_attn_out": cache[f"blocks.{u}.hook_attn_out"], f"{u}_mlp_out": cache[f"blocks.{u}.hook_mlp_out"]}
    key = f"blocks.{u}.attn.hook_result"
    if key in cache.keys():
        result = cache[key]
    else:
        z, w_o = cache[f"blocks.{u}.attn.hook_z"], model.blocks[u].attn.W_O
        result = torch.einsum("...he,hem->...hm", z, w_o.to(z.dtype))
    parts = {f"L{u}H{h}": result[..., h, :] for h in range(model.cfg.n_heads)}
    parts[f"{u}_attn_bias"] = model.blocks[u].attn.b_O.expand_as(result[..., 0, :])
    parts[f"{u}_mlp_out"] = cache[f"blocks.{u}.hook_mlp_out"]
    return parts


def _mix(cache, model, prefix: str, t: int | None, core: Parts, h: Parts, h0: Parts, emb: Parts, memory):
    """The state after a loop step (or the MeSH entry cycle), as parts; returns (parts, memory)."""
    cfg = model.cfg
    if cfg.variant == "mesh":
        write, read = cache[f"{prefix}.mesh.hook_write_weights"], cache[f"{prefix}.mesh.hook_read_weights"]
        memory = [_add((m, 1), (core, write[..., b : b + 1])) for b, m in enumerate(memory)]
        return _add(*((m, read[..., b : b + 1]) for b, m in enumerate(memory))), memory
    if cfg.variant in ("static_comb", "dynamic_comb"):
        a = comb_coefficients(cache, model, t)
        return _add((core, a[..., 0:1]), (h0, a[..., 1:2]), (emb, a[..., 2:3])), memory
    terms = cfg.supplement_terms
    extra = [(h, 1)] * ("residual" in terms) + [(h0, 1)] * ("anchor" in terms) + [(emb, 1)] * ("anchor_emb" in terms)
    return _add((core, 1), *extra), memory


def decompose_looped(cache, layer: int | None = None, heads: bool = False, model=None):
    """The residual entering unrolled layer `layer` (None / -1 / n_layers: the final residual h_out, before
    ln_final) as (stack [components, batch, seq, d], labels), exact for looped models: every component enters
    with the multiplicity the loop gives it (carried twice by residual, scaled by comb coefficients, spread
    over slots and read back by MeSH). Labels follow TL: "embed", "{u}_attn_out", "{u}_mlp_out"; with
    heads=True, "L{u}H{h}" (head results, from hook_result or hook_z @ W_O) plus "{u}_attn_bias" (b_O).
    For vanilla and base models this equals TL's cache.decompose_resid(layer). The stack sums to the cached
    residual (tested) and feeds TL's `cache.logit_attrs(stack, tokens)` for direct logit attribution."""
    model = _model(cache, model)
    cfg = model.cfg
    n = cfg.n_layers
    layer = n if layer is None or layer == -1 else layer
    if not 0 <= layer <= n:
        raise ValueError(f"layer must be in 0..{n} (n_layers = the final residual), got {layer}")
    emb = {"embed": cache["hook_embed"]}
    h, u = emb, 0

    def run(h: Parts, count: int) -> tuple[Parts, bool]:
        nonlocal u
        for _ in range(count):
            if u == layer:
                return h, True
            h, u = _add((h, 1), (_layer_parts(cache, model, u, heads), 1)), u + 1
        return h, False

    if cfg.is_vanilla:
        h, _ = run(h, n)
        return _stacked(h)
    h, done = run(h, cfg.prelude_layers)
    memory = None
    if not done and cfg.variant == "mesh":
        memory = [emb] + [{} for _ in range(cfg.mesh_slots - 1)]
        h, memory = _mix(cache, model, "entry", None, h, h, h, emb, memory)
    h0 = h
    for t, size in enumerate(cfg.block_layers):
        if done:
            break
        core, done = run(h, size)
        if not done:
            h, memory = _mix(cache, model, f"loop.{t}", t, core, h, h0, emb, memory)
        else:
            h = core
    if not done:
        h, done = run(h, cfg.coda_layers)
    return _stacked(h)


def _stacked(parts: Parts) -> tuple[torch.Tensor, list[str]]:
    labels = list(parts)
    shape = torch.broadcast_shapes(*(p.shape for p in parts.values()))
    return torch.stack([parts[k].expand(shape) for k in labels]), labels
