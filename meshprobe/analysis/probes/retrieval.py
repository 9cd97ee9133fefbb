"""Embedding-retrieval probe: ridge regression from a state onto a fixed code of a target token, fitted from
streamed sufficient statistics, then nearest-code retrieval over the full vocabulary.

* **Statistics** (float64, per cross-validation fold of the training sequences): row count, ``sum x``,
  ``sum x x^T`` for the state; per target, ``sum y``, ``sum x y^T`` and ``sum ||y||^2``. Features are shifted
  by the first batch's mean before summing (precision). Memory: ``folds * (d^2 + d) + targets * folds *
  (d e + e)`` numbers, independent of the number of rows.
* **Model**: features z-scored with the training mean / population std, intercept unpenalized, penalty
  ``alpha = l2 * n_train`` (so ``l2`` is per-sample), solved through the eigendecomposition of the z-scored
  Gram matrix so that every ``l2`` of the grid costs one small matrix product.
* **Choice of l2**: the grid value with the smallest summed held-out squared error over the folds (each fold
  predicted by the fit on the other folds), computed exactly from the fold statistics.
* **Read-out** on held-out rows: R^2 = 1 - SSE / SST pooled over code dimensions (SST around the held-out
  mean, scikit-learn's ``r2_score(..., multioutput="variance_weighted")``), and retrieval: the predicted code's
  nearest code (Euclidean) among all ``V`` rows of the code table; top-1 / top-5 accuracy.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RIDGE_GRID", "RidgeStats", "RidgeFit", "retrieval_ranks"]

#: default per-sample ridge path
RIDGE_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

_F64 = torch.float64


class RidgeStats:
    """Streamed sufficient statistics for ridge maps from one feature space (dim ``d``) onto several targets
    (code dim ``e``), split into ``folds`` folds."""

    def __init__(self, folds: int = 3):
        self.folds = max(1, folds)
        self.shift: Tensor | None = None
        self.n = torch.zeros(self.folds, dtype=_F64)
        self.sx = self.sxx = None
        self.sy: dict = {}
        self.sxy: dict = {}
        self.syy: dict = {}

    def add(self, X: Tensor, fold: Tensor, targets: dict) -> None:
        """Add rows ``X`` [n, d] in folds ``fold`` [n] with target codes ``targets[key]`` [n, e]."""
        X = X.to(_F64)
        if self.shift is None:
            d = X.shape[1]
            self.shift = X.mean(0) if len(X) else torch.zeros(d, dtype=_F64)
            self.sx = torch.zeros(self.folds, d, dtype=_F64)
            self.sxx = torch.zeros(self.folds, d, d, dtype=_F64)
        X = X - self.shift
        for f in range(self.folds):
            m = fold == f
            if not bool(m.any()):
                continue
            Xf = X[m]
            self.n[f] += len(Xf)
            self.sx[f] += Xf.sum(0)
            self.sxx[f] += Xf.T @ Xf
            for key, Y in targets.items():
                Yf = Y[m].to(_F64)
                if key not in self.sy:
                    e = Y.shape[1]
                    self.sy[key] = torch.zeros(self.folds, e, dtype=_F64)
                    self.sxy[key] = torch.zeros(self.folds, X.shape[1], e, dtype=_F64)
                    self.syy[key] = torch.zeros(self.folds, dtype=_F64)
                self.sy[key][f] += Yf.sum(0)
                self.sxy[key][f] += Xf.T @ Yf
                self.syy[key][f] += (Yf * Yf).sum()

    def nbytes(self) -> int:
        ts = [self.n, self.sx, self.sxx, *self.sy.values(), *self.sxy.values(), *self.syy.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def _sums(self, key, folds):
        idx = torch.as_tensor(folds, dtype=torch.long)
        return (float(self.n[idx].sum()), self.sx[idx].sum(0), self.sxx[idx].sum(0), self.sy[key][idx].sum(0),
                self.sxy[key][idx].sum(0), float(self.syy[key][idx].sum()))

    def _solve(self, key, folds, grid):
        """Per l2 in grid: (M [d, e], mu [d], ybar [e]) with prediction ybar + (x - shift - mu) M."""
        n, sx, sxx, sy, sxy, _ = self._sums(key, folds)
        mu, ybar = sx / n, sy / n
        cxx = sxx - n * torch.outer(mu, mu)
        cxy = sxy - n * torch.outer(mu, ybar)
        var = torch.diagonal(cxx) / n
        # sxx - n mu^2 cancels: a variance below the float64 rounding of the raw second moment is a constant
        # column (left unscaled), whatever order the CPU summed in
        tiny = 64 * torch.finfo(_F64).eps * torch.diagonal(sxx) / n
        std = torch.where(var > tiny.clamp_min(torch.finfo(_F64).tiny), var.sqrt(), torch.ones_like(var))
        A = cxx / torch.outer(std, std)
        B = cxy / std[:, None]
        evals, Q = torch.linalg.eigh(A)
        QB = Q.T @ B
        return [((Q @ (QB / (evals.clamp_min(0) + l2 * n)[:, None])) / std[:, None], mu, ybar) for l2 in grid]

    def _sse(self, key, fold, M, mu, ybar) -> float:
        n, sx, sxx, sy, sxy, syy = self._sums(key, [fold])
        cxx = sxx - torch.outer(mu, sx) - torch.outer(sx, mu) + n * torch.outer(mu, mu)
        cxy = sxy - torch.outer(mu, sy) - torch.outer(sx, ybar) + n * torch.outer(mu, ybar)
        syy_c = syy - 2 * float(ybar @ sy) + n * float(ybar @ ybar)
        return syy_c - 2 * float((M * cxy).sum()) + float((M * (cxx @ M)).sum())

    def fit(self, key, grid=RIDGE_GRID) -> "RidgeFit":
        """Choose l2 by cross-validation over the folds, refit on all folds."""
        grid = tuple(grid)
        used = [f for f in range(self.folds) if self.n[f] > 0]
        if not used:
            raise ValueError("ridge probe: no training rows")
        cv = {}
        if len(used) >= 2 and len(grid) > 1:
            sse = torch.zeros(len(grid), dtype=_F64)
            for f in used:
                sols = self._solve(key, [g for g in used if g != f], grid)
                sse += torch.tensor([self._sse(key, f, *s) for s in sols], dtype=_F64)
            cv = {l2: float(s) / float(self.n.sum()) for l2, s in zip(grid, sse)}
            best = grid[int(sse.argmin())]
        else:
            best = grid[len(grid) // 2]
        M, mu, ybar = self._solve(key, used, [best])[0]
        return RidgeFit(M=M, offset=self.shift + mu, ybar=ybar, l2=best, cv=cv)


class RidgeFit:
    """A fitted ridge map: prediction ``ybar + (x - offset) @ M``; ``cv``: l2 -> held-out MSE per row."""

    def __init__(self, M: Tensor, offset: Tensor, ybar: Tensor, l2: float, cv: dict):
        self.M, self.offset, self.ybar, self.l2, self.cv = M, offset, ybar, l2, cv

    def predict(self, X: Tensor) -> Tensor:
        return self.ybar + (X.to(_F64) - self.offset) @ self.M


def retrieval_ranks(pred: Tensor, code: Tensor, target: Tensor, k: int = 5, chunk: int = 2048) -> Tensor:
    """For each predicted code ``pred`` [n, e], whether the target type ``target`` [n] is among the ``k``
    nearest rows (Euclidean) of ``code`` [V, e]; returns a bool [n, k] tensor whose column j-1 is "in the top
    j" (so column 0 is top-1)."""
    code = code.to(torch.float32)
    sq = (code * code).sum(1)
    out = []
    for s in range(0, len(pred), chunk):
        p = pred[s:s + chunk].to(torch.float32)
        score = 2 * p @ code.T - sq  # larger = nearer
        top = score.topk(min(k, code.shape[0]), dim=1).indices
        hit = top == target[s:s + chunk, None]
        out.append(hit.cumsum(1) > 0)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.bool)
