"""Exit rules: when could a looped model stop, and what would stopping there cost?

Each rule looks, per position, at the answer distribution p_t read after step t (the answer lens of
:mod:`meshprobe.dynamics.trajectory`) and the state h^(t), and exits at the first step t (1 <= t <= H, the
horizon) where it fires; a position where it never fires runs all H steps. Scored against the answer after H
steps (the reference, by default the trained K): compute saved (1 - mean exit step / H), answer changed
(argmax at the exit != reference), KL(reference || p_exit), how often it exits before the answer settles (the
first step from which the argmax stays the reference's), and accuracy when targets are given. An "oracle" row
exits exactly where the answer settles.

Rules (Huginn, arXiv 2502.05171, with its default thresholds; Pappone et al., arXiv 2509.23314; Ouro):

* entropy_diff   |H(p_t) - H(p_{t-1})| < 1e-3
* latent_diff    ||h^(t) - h^(t-1)|| / ||h^(t)|| < 0.03 (per position, over d)
* kl             KL(p_{t-1} || p_t) < 1e-3
* minp_kl        the same KL after a min-p filter (keep tokens with p >= 0.1 x max p, renormalised) < 1e-5
* argmax_stable  the argmax unchanged over the last 5 steps (5 equal successive comparisons)
* cosine         1 - cos(h^(t), h^(t-1)) < 1e-3
* acceleration   ||Delta_t - Delta_{t-1}|| / ||h^(t)|| < 0.03 (Delta_t = h^(t) - h^(t-1)) at two successive
                 steps ("two-hit"; the threshold is ours: the paper's depends on its model, we use the latent
                 rule's scale)
* ouro_gate      (models with an exit gate) the cumulative exit probability 1 - prod_{s<=t} (1 - sigmoid(g_s))
                 reaches 0.5
Comparisons with step t - 1 need t >= 2 for output rules (p_0 is not read for every model) and t >= 1 for
state rules (h^(0) exists); the acceleration needs t >= 2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from meshprobe.errors import UserError

THRESHOLDS = {"entropy_diff": 1e-3, "latent_diff": 0.03, "kl": 1e-3, "minp_kl": 1e-5, "argmax_stable": 5,
              "cosine": 1e-3, "acceleration": 0.03, "ouro_gate": 0.5}
MIN_P = 0.1


def _minp(logp: torch.Tensor) -> torch.Tensor:
    keep = logp >= logp.max(-1, keepdim=True).values + torch.log(torch.tensor(MIN_P, dtype=logp.dtype))
    return torch.log_softmax(logp.masked_fill(~keep, float("-inf")), -1)


def _kl_logp(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, 0 * log 0 = 0 (min-p zeroes tokens; a token p keeps and q drops is
    infinite, as it should be)."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def _fires(logits: torch.Tensor, states: torch.Tensor, gates, th: dict) -> dict[str, torch.Tensor]:
    """rule -> hits [H, b, seq] (bool): whether the rule fires at step t = 1..H."""
    H = logits.shape[0]
    logp = F.log_softmax(logits.double(), -1)
    ent = -(logp.exp() * logp).sum(-1)  # [H, b, seq]
    h = states.double()  # [H+1, b, seq, d]
    delta = h[1:] - h[:-1]
    hn = h[1:].norm(dim=-1).clamp_min(1e-30)
    no = torch.zeros_like(ent, dtype=torch.bool)[:1]
    out = {
        "entropy_diff": torch.cat([no, (ent[1:] - ent[:-1]).abs() < th["entropy_diff"]]),
        "latent_diff": delta.norm(dim=-1) / hn < th["latent_diff"],
        "kl": torch.cat([no, _kl_logp(logp[:-1], logp[1:]) < th["kl"]]),
        "minp_kl": torch.cat([no, _kl_logp(_minp(logp[:-1]), _minp(logp[1:])) < th["minp_kl"]]),
        "cosine": 1 - F.cosine_similarity(h[1:], h[:-1], dim=-1) < th["cosine"],
    }
    same = torch.cat([no, logits[1:].argmax(-1) == logits[:-1].argmax(-1)]).long()
    run_len = torch.zeros_like(same)
    for t in range(H):
        run_len[t] = (run_len[t - 1] + 1) * same[t] if t else same[t]
    out["argmax_stable"] = run_len >= th["argmax_stable"]
    accel = torch.cat([no.double() + 1e30, (delta[1:] - delta[:-1]).norm(dim=-1) / hn[1:]])
    hit = accel < th["acceleration"]
    out["acceleration"] = hit & torch.cat([no, hit[:-1]])
    if gates is not None:
        lam = torch.sigmoid(gates.double())
        out["ouro_gate"] = 1 - torch.cumprod(1 - lam, dim=0) >= th["ouro_gate"]
    return out


def settle_steps(logits: torch.Tensor) -> torch.Tensor:
    """Per position [b, seq], the first step t (1-based) from which the argmax equals the last step's."""
    am = logits.argmax(-1)
    agree = am == am[-1]
    H = logits.shape[0]
    settled = torch.full(agree.shape[1:], H, dtype=torch.long)
    for t in range(H - 1, -1, -1):  # walk back while the answer is already the final one
        still = agree[t:].all(dim=0)
        settled = torch.where(still, torch.full_like(settled, t + 1), settled)
    return settled


def _score(exit_step, logits, settle, targets) -> dict:
    H = logits.shape[0]
    idx = (exit_step - 1).clamp(0, H - 1)
    at_exit = logits.gather(0, idx[None, ..., None].expand(1, *logits.shape[1:]))[0]
    ref = logits[-1]
    lr, le = F.log_softmax(ref.double(), -1), F.log_softmax(at_exit.double(), -1)
    row = {"mean_exit": float(exit_step.double().mean()), "compute_saved": float(1 - exit_step.double().mean() / H),
           "answer_changed": float((at_exit.argmax(-1) != ref.argmax(-1)).double().mean()),
           "kl_lost": float((lr.exp() * (lr - le)).sum(-1).mean()),
           "premature": float((exit_step < settle).double().mean())}
    if targets is not None and (targets >= 0).any():
        mask = targets >= 0
        row["accuracy"] = float((at_exit.argmax(-1) == targets)[mask].double().mean())
        row["accuracy_full"] = float((ref.argmax(-1) == targets)[mask].double().mean())
    return row


def exits(logits: torch.Tensor, states: torch.Tensor, horizon: int | None = None, gates: torch.Tensor | None = None,
          targets: torch.Tensor | None = None, thresholds: dict | None = None) -> dict:
    """Score every exit rule (module docstring) up to `horizon` steps (default: all T given).

    logits [T, b, seq, V]: the answer after steps 1..T; states [T+1, b, seq, d]: h^(0..T); gates [T, b, seq]:
    exit-gate logits where the model has them; targets [b, seq] (-100 = none) for accuracy. Returns
    ``{"horizon", "thresholds", "settle_mean", "rules": {rule: row}}`` with the rows of ``_score``."""
    T = logits.shape[0]
    if states.shape[0] != T + 1:
        raise UserError(f"states must hold h^(0..T): {T + 1} states for {T} answers, got {states.shape[0]}")
    H = T if horizon is None else horizon
    if not isinstance(H, int) or isinstance(H, bool) or not 1 <= H <= T:
        raise UserError(f"horizon={horizon!r} must be an integer in 1..{T} (the steps run)")
    unknown = sorted(set(thresholds or {}) - set(THRESHOLDS))
    if unknown:
        raise UserError(f"thresholds: unknown rule(s) {unknown}; rules: {sorted(THRESHOLDS)}")
    th = {**THRESHOLDS, **(thresholds or {})}
    logits, states = logits[:H], states[:H + 1]
    gates = None if gates is None else gates[:H]
    settle = settle_steps(logits)
    rules = {}
    for name, hits in _fires(logits, states, gates, th).items():
        first = torch.where(hits.any(0), hits.long().argmax(0) + 1, torch.full_like(settle, H))
        rules[name] = _score(first, logits, settle, targets)
    rules["oracle"] = _score(settle, logits, settle, targets)
    return {"horizon": H, "thresholds": {k: th[k] for k in THRESHOLDS if k != "ouro_gate" or gates is not None},
            "settle_mean": float(settle.double().mean()), "rules": rules}
