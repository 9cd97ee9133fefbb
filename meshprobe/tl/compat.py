"""TransformerLens compatibility: per-head / LayerNorm / MLP hook holders with views of the weights they run,
and the model surface TL's ActivationCache helpers and `transformer_lens.patching` read (W_U, W_O,
accumulated_bias, tokens_to_residual_directions, set_use_attn_result, ...).

Names, shapes and semantics follow TransformerLens (checked against transformer-lens 4.3.0's
ActivationCache.py and patching.py). Hook holders carry no parameters: `bind` points them at the (possibly
tied) layer their call site runs, so `model.blocks[u].attn.W_O` is the weight used at unrolled layer u.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshprobe.tl import HookPoint


def run_hook(hook: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Call a HookPoint only when something is attached: idle hooks then cost one dict check."""
    if hook._forward_hooks or hook._backward_hooks:
        return hook(x)
    return x


def attached(hooks: list[HookPoint]) -> bool:
    """True when any of these HookPoints has a hook attached (the per-call cost of idle hooks)."""
    return any(h._forward_hooks or h._backward_hooks for h in hooks)


class BoundHooks(nn.Module):
    """A call site's HookPoints plus a *view* of the weights it runs (`bind`), so TransformerLens helpers can
    read `blocks[u].attn.W_O` etc. The weights are not registered here: tied weights stay stored once."""

    HOOKS: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        for name in self.HOOKS:
            setattr(self, name, HookPoint())
        object.__setattr__(self, "_weights", None)
        object.__setattr__(self, "_hook_list", tuple(getattr(self, n) for n in self.HOOKS))

    def bind(self, module: nn.Module) -> None:
        object.__setattr__(self, "_weights", module)  # a plain attribute: no submodule, no state_dict entry

    def active(self) -> bool:
        """True when any hook of this call site is attached (a loop over plain dicts: idle cost ~1 us)."""
        for h in self._hook_list:
            if h._forward_hooks or h._backward_hooks:
                return True
        return False


class AttnHooks(BoundHooks):
    """`blocks.{u}.attn`: TransformerLens's per-head hooks and weight views (W_Q [head, d, d_head], W_O
    [head, d_head, d], ...). hook_result fires only with `cfg.use_attn_result` (as in TransformerLens)."""

    HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
             "hook_z", "hook_result")

    def _qkv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._weights
        d = a.qkv.in_features
        w = a.qkv.weight[i * d : (i + 1) * d].view(a.n_heads, a.d_head, d).transpose(1, 2)
        return w, a.qkv.bias[i * d : (i + 1) * d].view(a.n_heads, a.d_head)

    W_Q = property(lambda self: self._qkv(0)[0])
    W_K = property(lambda self: self._qkv(1)[0])
    W_V = property(lambda self: self._qkv(2)[0])
    b_Q = property(lambda self: self._qkv(0)[1])
    b_K = property(lambda self: self._qkv(1)[1])
    b_V = property(lambda self: self._qkv(2)[1])
    W_O = property(lambda self: self._weights.out.weight.T.view(self._weights.n_heads, self._weights.d_head, -1))
    b_O = property(lambda self: self._weights.out.bias)


class MLPHooks(BoundHooks):
    """`blocks.{u}.mlp`: hook_pre / hook_post [batch, seq, d_mlp]; W_in [d, d_mlp], W_out [d_mlp, d]."""

    HOOKS = ("hook_pre", "hook_post")
    W_in = property(lambda self: self._weights.up.weight.T)
    b_in = property(lambda self: self._weights.up.bias)
    W_out = property(lambda self: self._weights.down.weight.T)
    b_out = property(lambda self: self._weights.down.bias)


class LNHooks(BoundHooks):
    """`blocks.{u}.ln1` / `ln2`: hook_scale [batch, seq, 1] (sqrt(var + eps)) and hook_normalized."""

    HOOKS = ("hook_scale", "hook_normalized")
    w = property(lambda self: self._weights.weight)
    b = property(lambda self: self._weights.bias)


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor, hooks: LNHooks) -> torch.Tensor:
    """ln(x); with a hook attached, computed as TransformerLens's LayerNorm does so hook_scale can be read."""
    if not hooks.active():
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    x = x - x.mean(-1, keepdim=True)
    scale = run_hook(hooks.hook_scale, (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt())
    return run_hook(hooks.hook_normalized, x / scale * ln.weight + ln.bias)


class HookedLayerNorm(nn.LayerNorm):
    """The final LayerNorm (`ln_final`, parameters `weight`/`bias` as before) with TransformerLens's
    `ln_final.hook_scale` / `hook_normalized`."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__(d, eps=eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()
        object.__setattr__(self, "_hook_list", (self.hook_scale, self.hook_normalized))

    active = BoundHooks.active
    w = property(lambda self: self.weight)
    b = property(lambda self: self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(self, x, self)

    def unhooked(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class TLModelSurface:
    """Mixin for MeshprobeModel: the attributes TransformerLens tooling reads off a model, over the unrolled
    depth (`blocks[u]` is unrolled layer u; tied core weights appear once per loop step)."""

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head results `blocks.{u}.attn.hook_result` [batch, seq, head, d] (off by default:
        memory grows by n_heads x the attention output, and attention leaves the fused kernel's output path)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, flag: bool) -> None:
        if flag:
            raise NotImplementedError("meshprobe layers have no split q/k/v inputs (use_split_qkv_input); "
                                      "patch blocks.{u}.attn.hook_q / hook_k / hook_v instead")

    set_use_attn_in = set_use_split_qkv_input

    W_U = property(lambda self: self.unembed.weight.T, doc="[d, vocab] unembedding")
    b_U = property(lambda self: self.unembed.weight.new_zeros(self.cfg.vocab_size), doc="zeros: no bias")
    W_E = property(lambda self: self.embed.weight * self.cfg.embed_scale, doc="[vocab, d], scale included")

    def _stack_blocks(self, part: str, name: str) -> torch.Tensor:
        return torch.stack([getattr(getattr(b, part), name) for b in self.blocks])

    W_Q = property(lambda self: self._stack_blocks("attn", "W_Q"), doc="[unrolled layer, head, d, d_head]")
    W_K = property(lambda self: self._stack_blocks("attn", "W_K"))
    W_V = property(lambda self: self._stack_blocks("attn", "W_V"))
    W_O = property(lambda self: self._stack_blocks("attn", "W_O"), doc="[unrolled layer, head, d_head, d]")
    b_O = property(lambda self: self._stack_blocks("attn", "b_O"))
    W_in = property(lambda self: self._stack_blocks("mlp", "W_in"))
    W_out = property(lambda self: self._stack_blocks("mlp", "W_out"))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """Sum of b_O (and b_out) of unrolled layers < layer (plus b_O of `layer` if mlp_input), as in
        TransformerLens. Only meaningful where the residual is a plain sum (see meshprobe.tl.decompose)."""
        total = self.unembed.weight.new_zeros(self.cfg.d_model)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O + (block.mlp.b_out if include_mlp_biases else 0)
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Residual direction(s) [..., d] of token id(s): W_U[:, token] with the final LayerNorm's weight
        folded in (TransformerLens's fold_ln), so TL's logit_attrs of a stack summing to the final residual
        sums to logit - ln_final.bias @ W_U[:, token] exactly."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.unembed.weight.device)
        return self.W_U[:, tokens].movedim(0, -1) * self.ln_final.weight

    def to_single_token(self, text: str) -> int:
        raise ValueError(f"the model holds no tokenizer: pass token ids, not {text!r} "
                         "(meshprobe.load_tokenizer(path).token_to_id(...))")

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.device = self.embed.weight.device  # TransformerLens places its result tensors on cfg.device
        return out
