"""A tuned lens per loop step: one affine translator per step (and one shared by all), trained to match the
model's final logits, reported beside the logit lens and the coda lens.

The logit lens reads a state h with the model's final norm and unembedding (``readout``); the tuned lens
(Belrose et al. 2023, tuned-lens 0.2) first applies an affine translator A_t(h) = h + W_t h + b_t learned for
that state, so a state in another basis or scale than the last one is still read. Here the states are the loop
states (one translator per step t) rather than layers, plus one translator shared by every step (does one map
fit the whole loop?). Fitting: least squares from h^(t) to h_out (the state the readout decodes into the final
logits) as the start (or the identity, where that reads held-out positions better: few positions), then Adam
on KL(final || lens) over minibatches of positions, keeping per state the translator that reads the last fifth
of the fitting positions best (early stopping). Scores are KL(final || lens) per step on held-out sequences
(the last quarter of the sequences given).

Saved as a folder: tuned_lens.safetensors (the translators) and tuned_lens.json (shapes, step names and the
model's fingerprint: a hash of its config and of a strided sample of every parameter), written atomically,
JSON last. A saved lens is refused for any model whose fingerprint differs.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from meshprobe.errors import UserError

FORMAT = "meshprobe-tuned-lens"
WEIGHTS, META = "tuned_lens.safetensors", "tuned_lens.json"


def fingerprint(model) -> str:
    """A short hash of the model's config and parameters (shapes, and every parameter sampled at <= 4096
    evenly spaced entries): two different models practically never share it, and it costs no full pass."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class TunedLens:
    """weight [S, d, d], bias [S, d]: the translator of each of S states (names in `steps`); shared_weight
    [d, d], shared_bias [d]: one translator for all; model: the fingerprint of the model it was fitted on."""

    weight: torch.Tensor
    bias: torch.Tensor
    shared_weight: torch.Tensor
    shared_bias: torch.Tensor
    steps: list[str]
    model: str
    meta: dict = field(default_factory=dict)

    def translate(self, h: torch.Tensor, i: int | None) -> torch.Tensor:
        """A_i(h) for state i (None: the shared translator); h [..., d]."""
        w, b = (self.shared_weight, self.shared_bias) if i is None else (self.weight[i], self.bias[i])
        return h + h @ w.to(h.dtype).T + b.to(h.dtype)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder `path` (module docstring); returns it."""
        from safetensors.torch import save_file

        from meshprobe import _io

        path = Path(path)
        tensors = {"weight": self.weight, "bias": self.bias, "shared_weight": self.shared_weight,
                   "shared_bias": self.shared_bias}
        with _io.atomic_dir(path, marker=META) as tmp:  # one folder switch: never new weights beside old JSON
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            _io.write_json(tmp / META, {"format": FORMAT, "format_version": 1, "model": self.model,
                                        "steps": self.steps, "d_model": int(self.weight.shape[-1]), **self.meta})
        return path


def load_lens(path: str | os.PathLike, model) -> TunedLens:
    """The tuned lens saved in folder `path`, for `model`; UserError if it was fitted on another model."""
    from safetensors.torch import load_file

    from meshprobe import _io

    path = _io.committed_dir(Path(path), META)  # the newest complete save, also one a crash left mid-switch
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise UserError(f"lens={str(path)!r} is not a saved tuned lens (no {META} and {WEIGHTS} there)")
    meta = _io.read_json(path / META, "tuned lens")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"lens={str(path)!r}: {META} is not a meshprobe tuned lens")
    mine = fingerprint(model)
    if meta.get("model") != mine:
        raise UserError(f"lens={str(path)!r} was fitted on another model (fingerprint {meta.get('model')}, this "
                        f"model's is {mine})")
    t = load_file(str(path / WEIGHTS))
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "model", "steps", "d_model")}
    return TunedLens(t["weight"], t["bias"], t["shared_weight"], t["shared_bias"], list(meta["steps"]), mine, extra)


# -- fitting ------------------------------------------------------------------------------------------------
def _least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the residual-form affine map x + x W^T + b closest to y in squared error (float64, ridge
    relative to the feature scale); x, y [N, d]."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                        device=gram.device)
    a = torch.linalg.solve(gram, xc.T @ yc)  # y ~ x a + c
    w = a.T - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return w.float(), (my - mx @ a).float()


@torch.no_grad()
def _start(x, y, x_val, val_logp, readout) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares on (x, y), or the identity (the logit lens) where that reads the validation positions
    better (few positions: least squares overfits), as the start of the KL refinement."""
    w, b = _least_squares(x, y)
    if _kl(val_logp, readout(x_val + x_val @ w.T + b)) < _kl(val_logp, readout(x_val)):
        return w, b
    return torch.zeros_like(w), torch.zeros_like(b)


def _kl(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || softmax(logits)) over positions."""
    return (target_logp.exp() * (target_logp - F.log_softmax(logits.float(), -1))).sum(-1).mean()


@torch.no_grad()
def _val_kl(weight, bias, val_states, val_logp, readout, shared: bool) -> torch.Tensor:
    """KL on the validation positions per state [S] (shared: one translator for all)."""
    out = []
    for i in range(val_states.shape[0]):
        w, b = (weight, bias) if shared else (weight[i], bias[i])
        h = val_states[i]
        out.append(_kl(val_logp, readout(h + h @ w.T + b)))
    return torch.stack(out)


def _refine(params, data, readout, steps, lr, batch, gen, shared: bool, check_every: int = 10) -> None:
    """Adam on KL(final || lens) for `steps` minibatches of `batch` fitting positions (all S states each step);
    every `check_every` steps the translators that read the validation positions best so far are kept (per
    state; early stopping), and restored at the end."""
    states, target_logp, val_states, val_logp = data
    weight, bias = params
    opt = torch.optim.Adam([weight, bias], lr=lr)
    S, N = states.shape[0], states.shape[1]
    best = _val_kl(weight, bias, val_states, val_logp, readout, shared)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    for step in range(1, steps + 1):
        idx = torch.randint(0, N, (min(batch, N),), generator=gen)
        loss = 0.0
        for i in range(S):
            w, b = (weight, bias) if shared else (weight[i], bias[i])
            h = states[i, idx]
            loss = loss + _kl(target_logp[idx], readout(h + h @ w.T + b))
        grads = torch.autograd.grad(loss / S, [weight, bias])  # only the lens: model weights get no .grad
        weight.grad, bias.grad = grads
        opt.step()
        if step % check_every == 0 or step == steps:
            kl = _val_kl(weight, bias, val_states, val_logp, readout, shared)
            with torch.no_grad():
                if shared:
                    if kl.mean() < best.mean():
                        best, best_w, best_b = kl, weight.detach().clone(), bias.detach().clone()
                else:
                    better = kl < best
                    best = torch.where(better, kl, best)
                    best_w[better], best_b[better] = weight.detach()[better], bias.detach()[better]
    with torch.no_grad():
        weight.copy_(best_w)
        bias.copy_(best_b)


def fit_tuned_lens(states: torch.Tensor, final_logits: torch.Tensor, readout, final_state: torch.Tensor,
                   step_names: list[str] | None = None, model: str = "", steps: int = 100, lr: float = 1e-3,
                   batch: int = 256, seed: int = 0) -> TunedLens:
    """Fit the translators (module docstring) on states [S, N, d] (N positions, flattened), the final logits
    [N, V], the state the readout decodes into them, final_state [N, d], and `readout` (h [n, d] -> logits).
    `steps` Adam steps of `batch` positions (0: least squares only). `model`: the fingerprint to store."""
    if states.ndim != 3 or final_logits.shape[0] != states.shape[1] or final_state.shape != states.shape[1:]:
        raise UserError(f"states [S, N, d], final_logits [N, V] and final_state [N, d] must agree, got "
                        f"{tuple(states.shape)}, {tuple(final_logits.shape)}, {tuple(final_state.shape)}")
    S, N, d = states.shape
    if N < 2:
        raise UserError(f"the tuned lens needs >= 2 positions to fit (one to validate), got {N}")
    gen = torch.Generator().manual_seed(seed)
    logp = F.log_softmax(final_logits.float(), -1).detach()
    states, final_state = states.float().detach(), final_state.float().detach()
    n_fit = N - max(1, N // 5)  # the last fifth of the positions (the last sequences) validates
    fit, val = (states[:, :n_fit], logp[:n_fit]), (states[:, n_fit:], logp[n_fit:])
    per = [_start(fit[0][i], final_state[:n_fit], val[0][i], val[1], readout) for i in range(S)]
    w0, b0 = _start(fit[0].reshape(-1, d), final_state[:n_fit].repeat(S, 1), val[0].reshape(-1, d),
                    val[1].repeat(S, 1), readout)
    weight = torch.stack([w for w, _ in per]).requires_grad_(True)
    bias = torch.stack([b for _, b in per]).requires_grad_(True)
    shared_w, shared_b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    with torch.enable_grad():
        _refine((weight, bias), (*fit, *val), readout, steps, lr, batch, gen, shared=False)
        _refine((shared_w, shared_b), (*fit, *val), readout, steps, lr, batch, gen, shared=True)
    names = step_names or [f"h^({i})" for i in range(S)]
    return TunedLens(weight.detach(), bias.detach(), shared_w.detach(), shared_b.detach(), names, model,
                     {"fit": {"adam_steps": steps, "lr": lr, "batch": batch, "seed": seed, "positions": N}})


@torch.no_grad()
def lens_kl(lens: TunedLens | None, states: torch.Tensor, final_logits: torch.Tensor, readout) -> dict[str, list]:
    """Per state i: KL(final || lens) for the logit lens, the tuned lens (its translator i) and the shared
    translator (None without a lens); states [S, N, d], final_logits [N, V]."""
    target = F.log_softmax(final_logits.float(), -1)
    out = {"logit": [], "tuned": [], "shared": []}
    for i in range(states.shape[0]):
        h = states[i].float()
        out["logit"].append(float(_kl(target, readout(h))))
        out["tuned"].append(float(_kl(target, readout(lens.translate(h, i)))) if lens is not None else None)
        out["shared"].append(float(_kl(target, readout(lens.translate(h, None)))) if lens is not None else None)
    return out
