"""Vanilla, recursive (Prelude - Core x K - Coda) and MeSH models with a HookPoint on every unrolled call site.

Read top to bottom: the GPT-NeoX (Pythia) layer, the per-call-site hook holders, the MeSH step, the model.
Equations and the paper's numbers: paper §1 (Yu et al. 2025, "MeSH").

Weights and hooks are kept apart on purpose. Weights live once in `prelude.layers`, `core.layers` (shared
by every loop step) or `blocks_weights.{t}` (unshared block layouts), and `coda.layers`. Hooks live in
`blocks.{u}` (one per *unrolled* layer u) and `loop.{t}` (one per loop step t), so each call site has its
own name and `run_with_cache` sees every iteration (a hook inside a tied layer would fire K times under one
name and keep only the last call). The per-head / LayerNorm / MLP hook holders inside `blocks.{u}` and the
model attributes TransformerLens tooling reads (W_U, W_O, accumulated_bias, ...) live in `tl_compat.py`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from meshprobe._tl import HookedRootModule, HookPoint
from meshprobe.config import ModelConfig
from meshprobe.decompose import LoopedActivationCache
from meshprobe.loss import linear_cross_entropy
from meshprobe.tl_compat import AttnHooks, HookedLayerNorm, LNHooks, MLPHooks, TLModelSurface, attached, layer_norm


def run_hook(hook: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """Call a HookPoint only when something is attached: idle hooks then cost one dict check."""
    if hook._forward_hooks or hook._backward_hooks:
        return hook(x)
    return x


# ---------------------------------------------------------------------------------------------------------
# The GPT-NeoX / Pythia layer: x + Attn(LN1(x)) + MLP(LN2(x)), rotary on the first rotary_pct of head dims.
# ---------------------------------------------------------------------------------------------------------
class LayerHooks(nn.Module):
    """The hook points of one unrolled layer call site `blocks.{u}` (no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.ln1 = LNHooks()
        self.ln2 = LNHooks()
        self.attn = AttnHooks()
        self.mlp = MLPHooks()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def bind(self, layer: "NeoXLayer") -> None:
        """Point the weight views at the (possibly tied) layer this call site runs."""
        self.ln1.bind(layer.ln_attn)
        self.ln2.bind(layer.ln_mlp)
        self.attn.bind(layer.attn)
        self.mlp.bind(layer.mlp)


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [n_ctx, rotary_dims] in GPT-NeoX's rotate-half layout."""
    dims = cfg.rotary_dims
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dims, 2, dtype=torch.float32) / max(dims, 1)))
    angles = torch.outer(torch.arange(cfg.n_ctx, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [batch, head, seq, d_head]; the rest pass through."""
    dims = cos.shape[-1]
    if dims == 0:
        return x
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg  # read live: `model.set_use_attn_result` flips cfg.use_attn_result
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x, cos, sin, hooks: AttnHooks) -> torch.Tensor:
        b, s, d = x.shape
        if self.cfg.use_attn_result or hooks.active():
            return self.forward_hooked(x, cos[:s], sin[:s], hooks)
        # Fast path (no per-head hook attached): fused scaled_dot_product_attention.
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos[:s], sin[:s]), apply_rotary(k, cos[:s], sin[:s])
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(z.transpose(1, 2).reshape(b, s, d))

    def forward_hooked(self, x, cos, sin, hooks: AttnHooks) -> torch.Tensor:
        """TransformerLens's hooks and shapes: q/k/v (before rotary), rot_q/rot_k, z [batch, seq, head, d_head];
        attn_scores (masked, before softmax) and pattern [batch, head, query, key] (these two switch to
        explicit attention); result [batch, seq, head, d] when cfg.use_attn_result (attn_out = sum + b_O)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.d_head).unbind(2)
        q, k, v = run_hook(hooks.hook_q, q), run_hook(hooks.hook_k, k), run_hook(hooks.hook_v, v)
        q = run_hook(hooks.hook_rot_q, apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2))
        k = run_hook(hooks.hook_rot_k, apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, seq, d_head]
        if attached([hooks.hook_attn_scores, hooks.hook_pattern]):
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            scores = run_hook(hooks.hook_attn_scores, scores.masked_fill(mask, float("-inf")))
            pattern = run_hook(hooks.hook_pattern, scores.softmax(dim=-1))
            z = pattern.to(v.dtype) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        z = run_hook(hooks.hook_z, z.transpose(1, 2))  # [batch, seq, head, d_head]
        if not self.cfg.use_attn_result:
            return self.out(z.reshape(b, s, d))
        w_o = self.out.weight.T.view(self.n_heads, self.d_head, d)
        result = run_hook(hooks.hook_result, torch.einsum("bshe,hem->bshm", z, w_o.to(z.dtype)))
        return result.sum(dim=2) + self.out.bias


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor, hooks: MLPHooks) -> torch.Tensor:
        return self.down(run_hook(hooks.hook_post, F.gelu(run_hook(hooks.hook_pre, self.up(x)))))


class NeoXLayer(nn.Module):
    """One Pythia layer (12 d^2 + 13 d parameters). Hooks come from the call site, not from the layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, hooks: LayerHooks) -> torch.Tensor:
        if attached([hooks.hook_resid_pre]):
            # A copy: the input may also be the loop state (read by routers / carried / anchored), and an
            # in-place patch of this layer's input must not leak into those (TL's patch setters edit in place).
            x = hooks.hook_resid_pre(x.clone())
        attn_out = run_hook(hooks.hook_attn_out, self.attn(layer_norm(self.ln_attn, x, hooks.ln1), cos, sin, hooks.attn))
        mlp_out = run_hook(hooks.hook_mlp_out, self.mlp(layer_norm(self.ln_mlp, x, hooks.ln2), hooks.mlp))
        return run_hook(hooks.hook_resid_post, x + attn_out + mlp_out)


class Stack(nn.Module):
    """A list of layers: the prelude or coda (with `hook_out`), the core, or one unshared block (whose
    output hook is `loop.{t}.hook_core_out`, one per call site)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, hook_out: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NeoXLayer(cfg) for _ in range(n_layers))
        if hook_out:
            self.hook_out = HookPoint()

    def forward(self, x, cos, sin, call_sites: list[LayerHooks]) -> torch.Tensor:
        for layer, hooks in zip(self.layers, call_sites):
            x = layer(x, cos, sin, hooks)
        return x


# ---------------------------------------------------------------------------------------------------------
# MeSH: a buffer of B slots, written and read by per-step routers (paper §1.3).
# ---------------------------------------------------------------------------------------------------------
class ChainedRead(torch.autograd.Function):
    """One read y = sum_i coef[i] * values[i]: coef [n, batch, seq, 1] (one contiguous column per value, the
    broadcast that PyTorch's CPU kernels run fastest), n values [batch, seq, d].

    The reads of one forward pass are chained through `pending`, an expanded placeholder [N, batch, seq, d] that
    holds no memory. Backward, the chain's gradient is one real [N, batch, seq, d] buffer (made by the last read):
    each read adds coef_i * g into row i for every value it read, in place, and the read where value i was new
    (i >= first_new) hands row i on as that value's gradient; earlier reads never touch it again. A value read at
    every step thus gets its gradient summed in place, instead of one fresh tensor per read that autograd then
    adds up (on CPU, MeSH's extra cost over the base model is this memory traffic). Reads stay pure functions:
    nothing outside the graph is kept, so retain_graph and partial torch.autograd.grad calls are exact.
    The gradient of each coefficient is a batched dot product (no product tensor). Differentiable once.
    """

    @staticmethod
    def forward(ctx, pending, coef, first_new, *values):
        ctx.set_materialize_grads(False)
        ctx.first_new, ctx.pending_shape = first_new, pending.shape
        ctx.save_for_backward(coef, *values)
        out = values[0] * coef[0]
        for i, value in enumerate(values[1:], start=1):
            out.addcmul_(coef[i], value)
        return out, coef.new_zeros(()).expand(pending.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, pending):
        coef, *values = ctx.saved_tensors
        fresh = pending is None  # the last read of the chain starts the buffer; its rows are written, not added
        if fresh:
            pending = coef.new_empty(ctx.pending_shape)
        grad_coef = None
        if grad is not None:
            for i in range(len(values)):
                if fresh:
                    torch.mul(grad, coef[i], out=pending[i])
                else:
                    pending[i].addcmul_(grad, coef[i])
            g = grad.unsqueeze(-2)  # [batch, seq, 1, d]
            grad_coef = torch.stack([(g @ value.unsqueeze(-1)).squeeze(-1) for value in values])
        elif fresh:
            pending.zero_()
        new = [pending[i] if i >= ctx.first_new else None for i in range(len(values))]
        return (pending, grad_coef, None, *new)


class MeshBuffer:
    """The B-slot memory of one forward pass, in one of two exact representations.

    Every write adds w_tau (x) x_tau to all slots, so the buffer is always m = sum_tau w_tau (x) x_tau over the
    written values x_tau (first h_emb with w = e_0, i.e. m_0 = h_emb and the other slots empty; then the prelude
    output; then each step's h_m), and a read is  sum_b r_b m_b = sum_tau <r, w_tau> x_tau : one scalar per token
    per written value. The fast form keeps only the written values and weights, so no [batch, B, seq, d] tensor
    is built, and chains its reads (ChainedRead) so the backward is as small. The dense form keeps the buffer
    itself: `dense=True` (the model's choice when a hook is attached to any `*.mesh.hook_memory`) builds it at
    every step so the hook sees it, and a change the hook makes flows into this read and every later write and
    read. The two agree up to float rounding (summation order; tested, forward and gradients). Router weights
    come slot-major, [batch, B, seq], so every reduction over the B slots runs along an outer dim (PyTorch's CPU
    kernels for a short innermost dim are ~10x slower).

    Dtype: router weights are cast to the dtype of the written values and the read is elementwise, so under
    bf16 autocast the state stays float32 like the other variants' residual stream (never an autocast bf16
    matmul; before this class the read was a bf16 einsum).
    """

    def __init__(self, h_emb: torch.Tensor, slots: int, dense: bool, n_values: int) -> None:
        """n_values: how many values the pass writes in all, h_emb included (K + 2 for K loop steps)."""
        e0 = torch.zeros(1, slots, 1, dtype=h_emb.dtype, device=h_emb.device)
        e0[:, 0] = 1.0
        self.weights, self.values = [e0.expand(h_emb.shape[0], slots, h_emb.shape[1])], [h_emb]  # the fast form
        self.pending = h_emb.new_zeros(()).expand(n_values, *h_emb.shape)  # the read chain's placeholder
        self.n_read = 0  # values already handed to a read (their gradients come from that read)
        self.dense = (e0.unsqueeze(-1) * h_emb.unsqueeze(1)) if dense else None  # [batch, B, seq, d]

    def write_read(self, w_write, x, w_read, hook_memory: HookPoint) -> torch.Tensor:
        """Write x [batch, seq, d] with weights w_write [batch, B, seq], then read with w_read [batch, B, seq]."""
        w_write, w_read = w_write.to(x.dtype), w_read.to(x.dtype)
        if self.dense is not None:
            self.dense = run_hook(hook_memory, self.dense + w_write.unsqueeze(-1) * x.unsqueeze(1))
            return (w_read.unsqueeze(-1) * self.dense).sum(dim=1)
        self.weights.append(w_write)
        self.values.append(x)
        if len(self.values) > self.pending.shape[0]:
            raise RuntimeError(f"MeshBuffer was sized for {self.pending.shape[0]} written values")
        coef = (torch.stack(self.weights) * w_read).sum(dim=2)  # [writes, batch, seq]
        # one contiguous [batch, seq, 1] column per value: a broadcast operand with a strided seq dim is slower
        out, self.pending = ChainedRead.apply(self.pending, coef.unsqueeze(-1), self.n_read, *self.values)
        self.n_read = len(self.values)
        return out


class MeshStep(nn.Module):
    """One write-read cycle. Routers read the step's INPUT state; the read happens after the write.

        w_w = softmax(W_write x + b),  w_r = softmax(W_read x + b)      [batch, seq, B]
        m_b <- m_b + w_w[..., b] * h_m                                   (writes accumulate)
        h_next = sum_b w_r[..., b] * m_b                                 (see MeshBuffer for how)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.write_router = nn.Linear(cfg.d_model, cfg.mesh_slots)
        self.read_router = nn.Linear(cfg.d_model, cfg.mesh_slots)
        self.hook_write_weights = HookPoint()  # [batch, seq, B]
        self.hook_read_weights = HookPoint()  # [batch, seq, B]
        self.hook_memory = HookPoint()  # [batch, B, seq, d], after this step's write

    def router_logits(self, router_input: torch.Tensor) -> torch.Tensor:
        """Both routers in one matmul -> logits in slot-major layout [batch, 2 (write, read), B, seq]. The model
        calls this as soon as the step's input exists (the matmul then reads it from cache), and `forward` later,
        after the core: the softmax and the hooks still come after the core's hooks."""
        weight = torch.cat([self.write_router.weight, self.read_router.weight])
        bias = torch.cat([self.write_router.bias, self.read_router.bias])
        return F.linear(router_input, weight, bias).unflatten(-1, (2, -1)).permute(0, 2, 3, 1)

    def forward(self, logits, h_m, memory: MeshBuffer) -> torch.Tensor:
        # Softmax over the slots in slot-major layout; the hooks see [batch, seq, B] views (.mT) of the weights.
        w_write, w_read = logits.softmax(dim=2).unbind(1)
        w_write = run_hook(self.hook_write_weights, w_write.mT).mT
        w_read = run_hook(self.hook_read_weights, w_read.mT).mT
        return memory.write_read(w_write, h_m, w_read, self.hook_memory)


class LoopStep(nn.Module):
    """Hooks (and, for MeSH / comb variants, the per-step parameters) of loop step `loop.{t}`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hook_state_in = HookPoint()  # h^(t)
        self.hook_core_out = HookPoint()  # f_core(h^(t)) before any mixing
        self.hook_state_out = HookPoint()  # h^(t+1)
        if cfg.variant == "mesh":
            self.mesh = MeshStep(cfg)
        elif cfg.variant == "static_comb":
            self.comb = nn.Parameter(torch.ones(3))  # (a1, a2, a3) start as +anchor+anchor*
        elif cfg.variant == "dynamic_comb":
            self.comb = nn.Linear(cfg.d_model, 3)  # a = W h^(t) + b per token, starts at (1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class MeshprobeModel(TLModelSurface, HookedRootModule):
    """Vanilla, recursive or MeSH language model; `forward(tokens) -> logits [batch, seq, vocab]`.

    State hooks: `hook_embed`, `prelude.hook_out`, `loop.{t}.hook_state_in/core_out/state_out`,
    `entry.mesh.*`, `loop.{t}.mesh.*`, `coda.hook_out`; per-layer hooks `blocks.{u}.*` over the unrolled
    depth u. Choices where the paper is silent are documented on ModelConfig and in `_supplement`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.hook_embed = HookPoint()
        if cfg.is_vanilla:
            self.layers = nn.ModuleList(NeoXLayer(cfg) for _ in range(cfg.unrolled_depth))
        else:
            self.prelude = Stack(cfg, cfg.prelude_layers)
            if cfg.shared:
                self.core = Stack(cfg, cfg.block_layers[0], hook_out=False)
            else:
                self.blocks_weights = nn.ModuleList(Stack(cfg, n, hook_out=False) for n in cfg.block_layers)
            self.loop = nn.ModuleList(LoopStep(cfg) for _ in range(cfg.n_loops))
            if cfg.variant == "mesh":
                self.entry = nn.Module()
                self.entry.mesh = MeshStep(cfg)
            self.coda = Stack(cfg, cfg.coda_layers)
        self.blocks = nn.ModuleList(LayerHooks() for _ in range(cfg.unrolled_depth))
        for hooks, layer in zip(self.blocks, self.unrolled_layers()):
            hooks.bind(layer)
        self.ln_final = HookedLayerNorm(d, cfg.layer_norm_eps)
        self.unembed = nn.Linear(d, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.init_weights()
        self.setup()

    @torch.no_grad()
    def reset_rotary(self) -> None:
        """Recompute the rotary tables in place (needed after `to_empty`, which leaves buffers unset)."""
        cos, sin = rotary_tables(self.cfg)
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    # --- init --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere, zero biases, LayerNorm (1, 0); output projections (attention out,
        MLP down) get std init_std / sqrt(2 * unrolled depth) (the paper's depth-aware init)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.unrolled_depth)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith("attn.out") or name.endswith("mlp.down")
                is_router = name.endswith("_router")
                if is_router and self.cfg.router_init == "zeros":
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cfg.variant == "dynamic_comb":
            for step in self.loop:
                nn.init.zeros_(step.comb.weight)
                nn.init.ones_(step.comb.bias)

    # --- forward -----------------------------------------------------------------------------------------
    def call_sites(self, start: int, n: int) -> list[LayerHooks]:
        return list(self.blocks[start : start + n])

    def step_weights(self, t: int) -> Stack:
        return self.core if self.cfg.shared else self.blocks_weights[t]

    def unrolled_layers(self) -> list[NeoXLayer]:
        """The layer (weights) run at each unrolled index u; tied core layers appear once per loop step."""
        if self.cfg.is_vanilla:
            return list(self.layers)
        steps = [layer for t in range(self.cfg.n_loops) for layer in self.step_weights(t).layers]
        return [*self.prelude.layers, *steps, *self.coda.layers]

    def forward(self, tokens: torch.Tensor, return_type: str = "logits", targets: torch.Tensor | None = None):
        """tokens [batch, seq] -> logits [batch, seq, vocab]; return_type "loss" gives the mean cross-entropy,
        "both" gives (logits, loss), "hidden" gives h_out (before the final LayerNorm). The loss is against the
        next tokens, or against `targets` [batch, seq] when given (-100 = no target there).

        "loss" without autocast never builds the logits (:mod:`meshprobe.loss`: same value and gradients, less
        time and memory); under autocast it takes the fp32 cross-entropy of the logits, as "both" does."""
        cfg = self.cfg
        if tokens.shape[-1] > cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds the model context n_ctx={cfg.n_ctx}")
        cos, sin = self.rotary_cos, self.rotary_sin
        h_emb = self.embed(tokens)
        if cfg.embed_scale != 1.0:
            h_emb = h_emb * cfg.embed_scale
        h_emb = run_hook(self.hook_embed, h_emb)
        if cfg.is_vanilla:
            h_out = h_emb
            for layer, hooks in zip(self.layers, self.blocks):
                h_out = layer(h_out, cos, sin, hooks)
        else:
            h_out = self.forward_recursive(h_emb, cos, sin)
        if return_type == "hidden":
            return h_out
        if return_type != "logits" and targets is None:
            # Targets padded rather than logits sliced: the same mean over the seq - 1 predicted positions,
            # without copying the [batch, seq - 1, vocab] logits (forward) and zero-filling their gradient.
            targets = F.pad(tokens[:, 1:], (0, 1), value=-100)
        if return_type == "loss" and not torch.is_autocast_enabled(h_out.device.type):
            return linear_cross_entropy(self.ln_final(h_out), self.unembed.weight, targets)
        logits = self.unembed(self.ln_final(h_out))
        if return_type == "logits":
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss if return_type == "loss" else (logits, loss)

    def forward_recursive(self, h_emb, cos, sin) -> torch.Tensor:
        cfg = self.cfg
        u = cfg.prelude_layers  # unrolled index of the next layer call
        prelude_out = run_hook(self.prelude.hook_out, self.prelude(h_emb, cos, sin, self.call_sites(0, u)))
        if cfg.variant == "mesh":
            dense = attached([self.entry.mesh.hook_memory, *(step.mesh.hook_memory for step in self.loop)])
            memory = MeshBuffer(h_emb, cfg.mesh_slots, dense, cfg.n_loops + 2)  # m_0 = h_emb, the other slots empty
            # Entry cycle: write the prelude output, read h^(0); routers see the prelude output.
            h = self.entry.mesh(self.entry.mesh.router_logits(prelude_out), prelude_out, memory)
        else:
            h = prelude_out
        h0 = h
        for t, step in enumerate(self.loop):
            h = run_hook(step.hook_state_in, h)
            logits = step.mesh.router_logits(h) if cfg.variant == "mesh" else None  # routers read h^(t)
            stack = self.step_weights(t)
            h_m = run_hook(step.hook_core_out, stack(h, cos, sin, self.call_sites(u, len(stack.layers))))
            u += len(stack.layers)
            if cfg.variant == "mesh":
                h_next = step.mesh(logits, h_m, memory)
            else:
                h_next = self._supplement(step, h_m, h, h0, h_emb)
            h = run_hook(step.hook_state_out, h_next)
        coda_out = self.coda(h, cos, sin, self.call_sites(u, cfg.coda_layers))
        return run_hook(self.coda.hook_out, coda_out)

    def _supplement(self, step: LoopStep, h_m, h, h0, h_emb) -> torch.Tensor:
        """h^(t+1) = f(h^(t)) + h_sup (paper §1.2). anchor = h^(0), the prelude output; anchor_emb = h_emb.
        static/dynamic comb: a1 h_m + a2 h^(0) + a3 h_emb; dynamic computes a per token from h^(t)."""
        variant = self.cfg.variant
        if variant in ("static_comb", "dynamic_comb"):
            a = step.comb if variant == "static_comb" else step.comb(h)
            return a[..., 0:1] * h_m + a[..., 1:2] * h0 + a[..., 2:3] * h_emb
        terms = self.cfg.supplement_terms
        out = h_m
        if "residual" in terms:
            out = out + h
        if "anchor" in terms:
            out = out + h0
        if "anchor_emb" in terms:
            out = out + h_emb
        return out

    def run_coda(self, h: torch.Tensor) -> torch.Tensor:
        """The coda applied to a state h [batch, seq, d] through hook-free call sites (no model hook fires);
        the identity for vanilla models."""
        if self.cfg.is_vanilla:
            return h
        idle = [LayerHooks().to(h.device) for _ in range(self.cfg.coda_layers)]
        return self.coda(h, self.rotary_cos, self.rotary_sin, idle)

    def readout(self, h: torch.Tensor, through_coda: bool = False) -> torch.Tensor:
        """Logits from an intermediate state h [batch, seq, d] (a "lens"): final LayerNorm + unembedding,
        optionally after running the coda first (`run_coda`)."""
        return self.unembed(self.ln_final.unhooked(self.run_coda(h) if through_coda else h))

    # --- introspection -----------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """total, non_embedding (everything but embed and unembed, final LN included, tied weights once),
        router (MeSH router weights and biases)."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel() + self.unembed.weight.numel()
        router = sum(p.numel() for n, p in self.named_parameters() if "_router." in n)
        return {"total": total, "non_embedding": total - embedding, "router": router}

    def state_hook_names(self) -> list[str]:
        """The state-level hooks (the public contract), in the order they fire (:mod:`meshprobe.hooks`)."""
        from meshprobe.hooks import state_hook_names

        return state_hook_names(self.cfg)

    def run_with_cache(self, *args, **kwargs):
        """TransformerLens's run_with_cache, returning a LoopedActivationCache: TL's ActivationCache whose
        residual-sum helpers refuse, with a one-line error, the layers where a loop step mixes states."""
        out, cache = super().run_with_cache(*args, **kwargs)
        cache_dict = getattr(cache, "cache_dict", cache)
        has_batch_dim = getattr(cache, "has_batch_dim", not kwargs.get("remove_batch_dim", False))
        return out, LoopedActivationCache(cache_dict, self, has_batch_dim=has_batch_dim)


def build_model(cfg: ModelConfig | dict, device: str | torch.device | None = None) -> MeshprobeModel:
    """Build a model from a ModelConfig (or its dict). device="meta" builds without allocating memory."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    if device is None:
        return MeshprobeModel(cfg)
    with torch.device(device):
        return MeshprobeModel(cfg)
