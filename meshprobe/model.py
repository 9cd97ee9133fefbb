"""Vanilla, recursive (Prelude - Core x K - Coda) and MeSH models with a HookPoint on every unrolled call site.

Read top to bottom: the GPT-NeoX (Pythia) layer, the per-call-site hook holders, the model. MeSH's memory
(routers, buffer, read) is in `mesh.py`; the chunked loss in `loss.py`.
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

from meshprobe.tl import HookedRootModule, HookPoint
from meshprobe.config import ModelConfig
from meshprobe.tl.decompose import LoopedActivationCache
from meshprobe.loss import linear_cross_entropy
from meshprobe.mesh import MeshBuffer, MeshStep
from meshprobe.tl.compat import (AttnHooks, HookedLayerNorm, LNHooks, MLPHooks, TLModelSurface, attached, layer_norm,
                                 run_hook)


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
