"""The causal check: ablate one feature at one loop step and measure what the model's output loses.

Ablating feature f at source s subtracts its decoder contribution c_f(x) W_dec[f, s] (units of the
activations) from the hook of that source (h^(0): ``loop.0.hook_state_in``, h^(t+1): ``loop.{t}.hook_state_out``,
h_emb / h_out: ``hook_embed`` / ``coda.hook_out``) with ``run_with_hooks``, where c_f(x) is the feature's code on
the clean run (the crosscoder reads every source at once, so the code is fixed before any hook fires). The
change is measured downstream: the mean next-token (or task-target) loss and the mean logit of the right
answer. A feature read where its profile is ~0 has nothing to subtract, so its effect can only appear from its
birth step on; that it does *also* matter there (the effect is not zero) is what the check adds to the profile.
Memory slots are not ablated (the buffer after the last write is not read again by the model).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from meshprobe.features.crosscoder import LoopCrosscoder
from meshprobe.features.sources import SourceSpec, _stack

__all__ = ["ablation_effects"]


def _metrics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, mean logit of the target) over the positions with a target (>= 0)."""
    logits = logits.float()
    mask = targets >= 0
    lp = F.cross_entropy(logits[mask], targets[mask], reduction="mean")
    answer = logits[mask].gather(1, targets[mask][:, None]).mean()
    return float(lp), float(answer)


def _next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    return F.pad(tokens[:, 1:], (0, 1), value=-100)


@torch.no_grad()
def ablation_effects(model, cc: LoopCrosscoder, spec: SourceSpec, tokens: torch.Tensor, features: Sequence[int],
                     targets: torch.Tensor | None = None, batch_size: int = 8, skip_first: int = 1) -> dict:
    """Ablate each feature in ``features`` at each state source (not the slots), one at a time.

    ``tokens`` [N, seq]; ``targets`` [N, seq] (negative = no target; default: the next token). Returns
    ``{"features", "sources" (names), "clean_loss", "clean_logit", "d_loss" [f][s], "d_logit" [f][s]}`` where
    d_* = ablated - clean, averaged over batches (a positive d_loss: the feature helped)."""
    targets = _next_token_targets(tokens) if targets is None else targets
    states = [s for s, kind in enumerate(spec.kinds) if kind != "slot"]
    hooks = list(dict.fromkeys(spec.hooks))
    dec = cc.decoder  # [F, S, d] units of the activations
    n_feat = len(features)
    d_loss = torch.zeros(n_feat, len(states), dtype=torch.float64)
    d_logit = torch.zeros_like(d_loss)
    clean_loss = clean_logit = 0.0
    n_batches = 0
    device = next(model.parameters()).device
    for start in range(0, tokens.shape[0], batch_size):
        tok = tokens[start:start + batch_size].to(device)
        tgt = targets[start:start + batch_size].to(device)
        if not bool((tgt >= 0).any()):
            continue
        logits, cache = model.run_with_cache(tok, names_filter=lambda name: name in hooks)
        acts = _stack({h: cache[h].float() for h in hooks}, spec, skip_first)  # [b, L, S, d]
        b, L = acts.shape[:2]
        codes = cc.encode(acts.reshape(b * L, *acts.shape[2:]).cpu()).view(b, L, -1)
        base_loss, base_logit = _metrics(logits, tgt)
        clean_loss, clean_logit, n_batches = clean_loss + base_loss, clean_logit + base_logit, n_batches + 1
        for i, f in enumerate(features):
            c = codes[..., f].to(device)
            if not bool((c > 0).any()):
                continue
            for j, s in enumerate(states):
                delta = c[..., None] * dec[f, s].to(device)  # [b, L, d]

                def ablate(x, hook, delta=delta):
                    x = x.clone()
                    x[:, skip_first:] -= delta.to(x.dtype)
                    return x

                out = model.run_with_hooks(tok, fwd_hooks=[(spec.hooks[s], ablate)])
                loss, logit = _metrics(out, tgt)
                d_loss[i, j] += loss - base_loss
                d_logit[i, j] += logit - base_logit
    n = max(n_batches, 1)
    return {"features": [int(f) for f in features], "sources": [spec.names[s] for s in states],
            "clean_loss": clean_loss / n, "clean_logit": clean_logit / n,
            "d_loss": (d_loss / n).tolist(), "d_logit": (d_logit / n).tolist()}
