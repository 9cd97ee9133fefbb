"""Multinomial logistic regression (softmax cross-entropy + L2) in torch, with the L2 strength chosen by
cross-validation over groups (sequences). Used by the token and loop-step probes.

Objective, on z-scored features (mean / std of the training rows; zero-variance features keep scale 1):

    mean_i CE(softmax(x_i W + b), y_i) + (l2 / 2) * ||W||_F^2          (the intercept b is not penalized)

which is scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` objective divided by ``n`` (tested against it).
Solved full-batch with torch's L-BFGS (strong-Wolfe line search). ``l2`` is per-sample, so the same value
means the same thing for any number of rows.

Cross-validation: groups (sequence ids) go to ``folds`` folds by a seeded hash; for each fold the path of
``l2`` values is run from the strongest to the weakest penalty, each fit warm-started from the previous one,
and the held-out mean cross-entropy is recorded; the path stops early at the first rise of the held-out loss
(it is unimodal in practice). The chosen ``l2`` minimises the fold-averaged held-out cross-entropy
over the values every fold reached. The final fit on all rows is warm-started from the first fold's fit at
that value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from meshprobe.analysis.stats import cv_fold

__all__ = ["L2_GRID", "fit_softmax", "fit_softmax_many", "SoftmaxProbe", "fit_softmax_cv"]

#: default per-sample L2 path, strongest first (decades: the held-out loss is flat within a factor of ~3 of its
#: minimum on the bundled checkpoints, and every extra value costs a fit per fold)
L2_GRID: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)


def fit_softmax(X: Tensor, y: Tensor, n_classes: int, l2: float, *, init: Tensor | None = None,
                max_iter: int = 100, tol: float = 1e-4) -> Tensor:
    """Fit ``[W; b]`` ([d + 1, C], the last row is the intercept) minimising the module's objective on the
    (already standardized) rows ``X`` [n, d] with labels ``y`` [n] in ``[0, n_classes)``. ``init``: a warm
    start of the same shape. ``tol``: stop when the largest gradient entry is below it."""
    n, d = X.shape
    Wb = torch.zeros(d + 1, n_classes, dtype=X.dtype) if init is None else init.detach().clone().to(X.dtype)
    Wb.requires_grad_(True)
    opt = torch.optim.LBFGS([Wb], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        W, b = Wb[:-1], Wb[-1]
        loss = F.cross_entropy(torch.addmm(b, X, W), y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Wb.detach()


def fit_softmax_many(X: Tensor, Y: Tensor, n_classes: int, l2: float, *, max_iter: int = 100,
                     tol: float = 1e-4) -> Tensor:
    """``P`` independent problems on the same rows ``X`` [n, d] with labels ``Y`` [n, P] (e.g. permuted labels),
    solved as one: the objective is the sum of the ``P`` objectives, which is separable, so its minimiser is the
    ``P`` individual minimisers (one L-BFGS loop instead of ``P``). Returns ``[P, d + 1, C]``."""
    n, d = X.shape
    P = Y.shape[1]
    Wb = torch.zeros(d + 1, P * n_classes, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([Wb], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        W, b = Wb[:-1], Wb[-1]
        logits = torch.addmm(b, X, W).reshape(n * P, n_classes)
        loss = P * F.cross_entropy(logits, Y.reshape(-1)) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Wb.detach().reshape(d + 1, P, n_classes).permute(1, 0, 2)


@dataclass
class SoftmaxProbe:
    """A fitted probe: z-scoring ``mean`` / ``std`` [d], weights ``Wb`` [d + 1, C], the chosen ``l2`` and the
    cross-validation curve ``cv`` (l2 -> fold-averaged held-out mean cross-entropy, nats)."""
    mean: Tensor
    std: Tensor
    Wb: Tensor
    l2: float
    cv: dict[float, float] = field(default_factory=dict)

    def logits(self, X: Tensor) -> Tensor:
        Z = (X.to(self.Wb.dtype) - self.mean) / self.std
        return torch.addmm(self.Wb[-1], Z, self.Wb[:-1])

    def predict(self, X: Tensor) -> Tensor:
        return self.logits(X).argmax(-1)


def _zscore_params(X: Tensor) -> tuple[Tensor, Tensor]:
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    # a constant column's std is the rounding of its mean (a few ulps of |mean| in X's dtype, depending on the
    # CPU's summation order): below that it is noise, not signal, and is left unscaled
    tiny = 16 * torch.finfo(X.dtype).eps * mean.abs()
    return mean, torch.where(std > tiny.clamp_min(torch.finfo(X.dtype).tiny), std, torch.ones_like(std))


def _path(Xtr, ytr, Xva, yva, C, grid, max_iter, tol, keep: dict | None = None) -> list[float]:
    """Held-out CE along the l2 path (strongest first, warm starts), stopping at the first rise."""
    losses, Wb = [], None
    for l2 in grid:
        Wb = fit_softmax(Xtr, ytr, C, l2, init=Wb, max_iter=max_iter, tol=tol)
        if keep is not None:
            keep[l2] = Wb
        with torch.no_grad():
            losses.append(float(F.cross_entropy(torch.addmm(Wb[-1], Xva, Wb[:-1]), yva)))
        if len(losses) > 1 and losses[-1] > losses[-2]:
            break
    return losses


def fit_softmax_cv(X: Tensor, y: Tensor, groups: Tensor, n_classes: int, *, grid=L2_GRID, folds: int = 3,
                   seed: int = 0, max_iter: int = 100, cv_max_iter: int = 30, tol: float = 1e-4,
                   dtype: torch.dtype = torch.float32) -> SoftmaxProbe:
    """Z-score ``X`` [n, d], choose ``l2`` from ``grid`` by ``folds``-fold cross-validation over ``groups``
    [n] (sequence ids: rows of one sequence stay in one fold), refit on all rows. ``folds < 2`` or a single
    grid value skips the CV (then the middle grid value is used). Deterministic for a given ``seed``.
    ``cv_max_iter``: L-BFGS iterations per path point in the CV (the path is warm-started, so later points
    continue earlier ones); ``max_iter`` / ``tol``: the final fit."""
    X = X.to(dtype)
    mean, std = _zscore_params(X)
    Z = (X - mean) / std
    grid = tuple(sorted(grid, reverse=True))
    fold = torch.from_numpy(cv_fold(groups.numpy(), max(folds, 1), seed))
    curves, first = [], {}
    if folds >= 2 and len(grid) > 1:
        for k in range(folds):
            va = fold == k
            if va.all() or not va.any():
                continue
            curves.append(_path(Z[~va], y[~va], Z[va], y[va], n_classes, grid, cv_max_iter, tol,
                                keep=first if not first else None))
    if curves:
        reached = min(len(c) for c in curves)
        cv = {grid[j]: float(np.mean([c[j] for c in curves])) for j in range(reached)}
        best = min(cv, key=cv.get)
    else:
        cv, best = {}, grid[-1] if len(grid) == 1 else grid[len(grid) // 2]
    Wb = fit_softmax(Z, y, n_classes, best, init=first.get(best), max_iter=max_iter, tol=tol)
    return SoftmaxProbe(mean=mean, std=std, Wb=Wb, l2=best, cv=cv)
