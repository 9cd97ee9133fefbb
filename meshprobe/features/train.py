"""Training a :class:`~meshprobe.features.crosscoder.LoopCrosscoder`: :func:`train_crosscoder`.

One step on a batch x [n, S, d] (normalised): codes = select(relu(pre)), error = x - decode(codes),
loss = mean_n sum_s |error|^2 (+ the L1 penalty, + the AuxK loss of the dead features). Adam; the learning rate
decays linearly over the last 20% of the steps when their number is known.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from meshprobe.errors import UserError
from meshprobe.features.crosscoder import LoopCrosscoder, _as_rows, _batches, check_sizes

__all__ = ["train_crosscoder"]


def train_crosscoder(acts: torch.Tensor | Iterable[torch.Tensor], n_features: int, k: int, seed: int = 0, *,
                     method: str = "batchtopk", steps: int | None = None, epochs: float = 20.0,
                     batch_size: int = 1024, lr: float = 2e-3, l1_coef: float = 1.0, aux_coef: float = 1 / 32,
                     dead_after: int | None = None, source_names: list[str] | None = None,
                     meta: dict | None = None, on_step: Callable[[int, dict], None] | None = None
                     ) -> LoopCrosscoder:
    """Train a crosscoder with ``n_features`` features on ``acts``: a float tensor [N, S, d] (``steps``
    batches of random rows, default ``epochs`` passes) or an iterable of [n, S, d] batches (one pass, cut to
    ``batch_size`` rows; ``steps`` caps it). ``k``: the mean number of active features per row (BatchTopK);
    the L1 variant (``method="l1"``) takes its sparsity from ``l1_coef`` and records k only.

    The per-source scale and the decoder bias come from the first batch. ``dead_after``: rows without firing
    after which a feature counts as dead (default 20 batches' worth); ``aux_coef``: weight of the AuxK loss
    that revives them (0 turns it off). ``on_step(step, stats)`` is called every step (progress, logging).
    The result is in eval mode; ``meta["training"]`` holds the run's settings and final statistics.
    """
    check_sizes(n_features, k, method)
    if batch_size < 1 or (steps is not None and steps < 1) or not epochs > 0 or not lr > 0:
        raise UserError(f"batch_size={batch_size}, steps={steps}, epochs={epochs} and lr={lr} must be positive")
    if isinstance(acts, torch.Tensor):
        acts = _as_rows(acts)
        if acts.shape[0] < 2:
            raise UserError(f"acts has {acts.shape[0]} rows: need at least 2")
    total = steps if steps is not None or not isinstance(acts, torch.Tensor) else \
        max(1, math.ceil(epochs * acts.shape[0] / batch_size))
    batches = _batches(acts, batch_size, total, epochs, seed)
    first = next(batches, None)
    if first is None:
        raise UserError("acts is empty: no batch to train on")
    first = first.float()
    S, d = first.shape[1:]
    if source_names is not None and len(source_names) != S:
        raise UserError(f"{len(source_names)} source_names for {S} sources")
    cc = _init(first, n_features, k, method, seed, source_names, meta)
    state = _State(cc, lr, total, dead_after if dead_after is not None else 20 * batch_size)
    step = 0
    for x in _chain(first, batches):
        stats = _step(cc, state, x.float(), step, l1_coef, aux_coef)
        step += 1
        if on_step is not None:
            on_step(step, stats)
    cc.meta["training"] = {"method": method, "steps": step, "batch_size": batch_size, "lr": lr, "seed": seed,
                           "l1_coef": l1_coef if method == "l1" else None, "aux_coef": aux_coef,
                           "dead_after": state.dead_after, "rows_seen": state.rows,
                           "final_loss": stats["loss"], "final_fvu": stats["fvu"],
                           "dead_at_end": float((state.since_fired >= state.dead_after).float().mean())}
    return cc.eval()


def _chain(first, rest):
    yield first
    yield from rest


def _init(x: torch.Tensor, F: int, k: int, method: str, seed: int, names, meta) -> LoopCrosscoder:
    """Scales from x's mean squared norm per source; decoder rows random unit vectors; encoder = decoder^T
    (a tied start trains faster and leaves fewer dead features); b_dec = the mean normalised row."""
    n, S, d = x.shape
    cc = LoopCrosscoder(S, d, F, k, method, names, meta)
    msq = x.pow(2).sum(-1).mean(0)
    if not bool((msq > 0).all()) or not bool(torch.isfinite(x).all()):
        bad = [cc.source_names[s] for s in range(S) if not msq[s] > 0]
        raise UserError(f"acts: sources {bad or 'some'} are all zero or not finite in the first batch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.scale.copy_(msq.rsqrt())
        w = torch.randn(F, S, d, generator=g)
        w /= w.flatten(1).norm(dim=1)[:, None, None]
        cc.W_dec.copy_(w if method == "batchtopk" else 0.1 * w)
        cc.W_enc.copy_(w.permute(1, 2, 0))
        cc.b_dec.copy_((x * cc.scale[:, None]).mean(0))
    return cc


class _State:
    """The optimizer and the counters of one training run."""

    def __init__(self, cc: LoopCrosscoder, lr: float, total: int | None, dead_after: int):
        self.opt = torch.optim.Adam(cc.parameters(), lr=lr, betas=(0.9, 0.999))
        self.lr, self.total, self.dead_after = lr, total, int(dead_after)
        self.since_fired = torch.zeros(cc.n_features, dtype=torch.long)
        self.rows, self.n_thr, self.thr_sum, self.thr_n = 0, 0, 0.0, 0

    def lr_at(self, step: int) -> float:
        if self.total is None:
            return self.lr
        decay_from = int(0.8 * self.total)
        return self.lr if step < decay_from else self.lr * (self.total - step) / max(1, self.total - decay_from)


def _aux_loss(cc: LoopCrosscoder, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the dead features' top activations per row reconstruct the error."""
    k_aux = min(int(dead.sum()), 2 * cc.k)
    dead_pre = pre * dead
    top = dead_pre.topk(k_aux, dim=1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    F, S, d = cc.W_dec.shape
    rec = (codes @ cc.W_dec.view(F, S * d)).view_as(err)
    target = err.detach()
    return (target - rec).pow(2).sum((1, 2)).mean() / target.pow(2).sum((1, 2)).mean().clamp_min(1e-12)


def _step(cc: LoopCrosscoder, st: _State, batch: torch.Tensor, step: int, l1_coef: float, aux_coef: float) -> dict:
    cc.train()
    x = cc.normalise(batch)
    pre = cc.pre_acts(x)
    codes = cc.select(pre, batch=True)
    err = x - cc.decode_normalised(codes)
    mse = err.pow(2).sum((1, 2)).mean()
    loss = mse
    fired = (codes > 0).any(0)
    st.since_fired += x.shape[0]
    st.since_fired[fired] = 0
    st.rows += x.shape[0]
    dead = st.since_fired >= st.dead_after
    aux = torch.zeros(())
    if aux_coef and bool(dead.any()):
        aux = _aux_loss(cc, pre, err, dead)
        loss = loss + aux_coef * aux
    if cc.method == "l1":
        loss = loss + l1_coef * (codes * cc.W_dec.norm(dim=-1).sum(1)).sum(1).mean()
    for group in st.opt.param_groups:
        group["lr"] = st.lr_at(step)
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cc.method == "batchtopk":
        _unit_norm_step(cc, st.opt)
        _track_threshold(cc, st, codes.detach())
    else:
        st.opt.step()
    total = x.sub(x.mean(0)).pow(2).sum((1, 2)).mean()
    loss, mse = loss.detach(), mse.detach()
    return {"loss": float(loss), "mse": float(mse), "fvu": float(mse / total.clamp_min(1e-12)),
            "aux": float(aux.detach()), "l0": float((codes > 0).sum(1).float().mean()), "dead": float(dead.float().mean())}


def _unit_norm_step(cc: LoopCrosscoder, opt: torch.optim.Optimizer) -> None:
    """Adam step with the decoder rows held at unit norm: the gradient along each row is removed first (it
    would only change the norm), the rows are renormalised after."""
    w, g = cc.W_dec.data, cc.W_dec.grad
    F = w.shape[0]
    w_flat, g_flat = w.view(F, -1), g.view(F, -1)
    g_flat -= (g_flat * w_flat).sum(1, keepdim=True) * w_flat
    opt.step()
    w /= w.view(F, -1).norm(dim=1).clamp_min(1e-12)[:, None, None]


def _track_threshold(cc: LoopCrosscoder, st: _State, codes: torch.Tensor) -> None:
    """The inference threshold: the mean of each batch's smallest kept activation over the second half of
    training when its length is known (early, noisy batches do not count), else a running average."""
    kept = codes[codes > 0]
    if kept.numel() == 0:
        return
    st.n_thr += 1
    smallest = float(kept.min())
    if st.total is not None and st.n_thr <= st.total // 2:
        cc.threshold.fill_(smallest)
        return
    st.thr_sum, st.thr_n = st.thr_sum + smallest, st.thr_n + 1
    if st.total is None:  # an open-ended stream: exponential average
        cc.threshold.fill_(smallest if st.thr_n == 1 else 0.99 * float(cc.threshold) + 0.01 * smallest)
    else:
        cc.threshold.fill_(st.thr_sum / st.thr_n)
