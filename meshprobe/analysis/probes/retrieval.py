"""Embedding-retrieval probe: ridge regression from a state onto a fixed code of a target token, fitted from
streamed statistics, then nearest-code retrieval over the full vocabulary.

* **Model**: features z-scored with the training mean / population std, intercept unpenalized, penalty
  ``alpha = l2 * n_train`` (so ``l2`` is per-sample).
* **Statistics** (streamed, memory independent of the number of rows N): while the training rows number at
  most ``max_rows`` (default: the feature dim ``d``), the rows themselves (as they come: float32 features are
  not rounded, float64 stays float64) with their target codes and folds; past that, float64 sums per
  cross-validation fold: row count, ``sum x``, ``sum x x^T``, and per target ``sum y``, ``sum x y^T``,
  ``sum ||y||^2`` (features shifted by the stored rows' mean first, for precision). The statistics of "every
  fold but f" are the sum of the other folds' parts. Memory: at most ``folds * (d^2 + targets * d * e)``
  float64 numbers (rows: less).
* **One factorisation per training set, shared**: a fit on a set of folds needs one symmetric
  eigendecomposition, reused by every target (offset) and every ``l2`` of the grid: of the z-scored ``d x d``
  Gram matrix (sums), or of the ``n x n`` kernel ``Z Z^T`` of the z-scored rows (rows, ``n <= d``: the same
  ridge, ``Z^T (Z Z^T + a)^-1 = (Z^T Z + a)^-1 Z^T``). ``folds + 1`` of them per feature space.
* **Choice of l2**: the grid value with the smallest summed held-out squared error over the folds (each fold
  predicted by the fit on the other folds), computed exactly in the eigenbasis: with ``C = Q^T B`` the
  rotated cross-covariance and ``w = 1 / (lambda + a)``, ``SSE(a) = s - 2 w . rowsum(C * P) + w^T (H * C C^T)
  w`` where ``s``, ``P``, ``H`` are the held-out fold's statistics in the same basis (one small quadratic form
  per ``l2``).
* **Read-out** on held-out rows: R^2 = 1 - SSE / SST pooled over code dimensions (SST around the held-out
  mean, scikit-learn's ``r2_score(..., multioutput="variance_weighted")``), and retrieval: the predicted code's
  nearest code (Euclidean) among all ``V`` rows of the code table; top-1 / top-5 accuracy.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RIDGE_GRID", "RidgeStats", "RidgeFit", "retrieval_ranks", "pca_code"]

#: default per-sample ridge path
RIDGE_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

_F64 = torch.float64


def _std(var: Tensor, mu: Tensor) -> Tensor:
    """Population std, 1 for (numerically) constant features: the variance comes from a second moment minus
    mu^2, which cancels, so a variance below the float64 rounding of that second moment is a constant column
    (left unscaled), whatever order the CPU summed in."""
    tiny = (64 * torch.finfo(_F64).eps * (var + mu * mu)).clamp_min(torch.finfo(_F64).tiny)
    return torch.where(var > tiny, var.sqrt(), torch.ones_like(var))


def _keep(X: Tensor) -> Tensor:
    """A row block as stored: float64 stays float64, anything else becomes float32 (features are float32)."""
    return X.detach() if X.dtype == _F64 else X.detach().float()


class _Factor:
    """The eigendecomposition of one training set (a set of folds): ``n`` rows, mean ``mu``, std ``std``,
    eigenvalues ``evals`` and vectors ``Q`` of the z-scored Gram matrix (sums) or kernel (rows, then ``Z`` is
    the z-scored rows and ``idx`` their positions)."""

    def __init__(self, folds: list[int], n: float, mu: Tensor, std: Tensor, evals: Tensor, Q: Tensor,
                 Z: Tensor | None = None, idx: Tensor | None = None):
        self.folds = torch.as_tensor(folds, dtype=torch.long)
        self.n, self.mu, self.std, self.evals, self.Q, self.Z, self.idx = n, mu, std, evals.clamp_min(0), Q, Z, idx

    def weights(self, l2: float) -> Tensor:
        return 1.0 / (self.evals + l2 * self.n)


class RidgeStats:
    """Streamed statistics for ridge maps from one feature space (dim ``d``) onto several targets (code dim
    ``e``), split into ``folds`` folds; ``max_rows``: keep the rows themselves up to this many (None: ``d``)."""

    def __init__(self, folds: int = 3, max_rows: int | None = None):
        self.folds = max(1, folds)
        self.max_rows = max_rows
        self.n = torch.zeros(self.folds, dtype=_F64)
        self.shift: Tensor | None = None  # set when the rows are folded into sums
        self.rows: list[Tensor] = []  # row mode: float32 feature rows, their folds, their targets
        self.row_fold: list[Tensor] = []
        self.row_y: dict = {}
        self.sx = self.sxx = None
        self.sy: dict = {}
        self.sxy: dict = {}
        self.syy: dict = {}

    @property
    def in_rows(self) -> bool:
        return self.shift is None

    def add(self, X: Tensor, fold: Tensor, targets: dict) -> None:
        """Add rows ``X`` [n, d] in folds ``fold`` [n] with target codes ``targets[key]`` [n, e]."""
        fold = torch.as_tensor(fold, dtype=torch.long)
        self.n += torch.bincount(fold, minlength=self.folds)[: self.folds].to(_F64)
        if self.in_rows:
            if self.max_rows is None:
                self.max_rows = X.shape[1]
            self.rows.append(_keep(X))
            self.row_fold.append(fold)
            for key, Y in targets.items():
                self.row_y.setdefault(key, []).append(_keep(Y))
            if self.n.sum() > self.max_rows:
                self._to_sums()
            return
        self._add_sums(X, fold, targets)

    def _to_sums(self) -> None:
        """Fold the stored rows into per-fold sums (when there are more rows than ``max_rows``)."""
        X, fold = torch.cat(self.rows), torch.cat(self.row_fold)
        Y = {k: torch.cat(v) for k, v in self.row_y.items()}
        self.rows, self.row_fold, self.row_y = [], [], {}
        self.shift = X.to(_F64).mean(0)
        d = X.shape[1]
        self.sx = torch.zeros(self.folds, d, dtype=_F64)
        self.sxx = torch.zeros(self.folds, d, d, dtype=_F64)
        self._add_sums(X, fold, Y)

    def _add_sums(self, X: Tensor, fold: Tensor, targets: dict) -> None:
        X = X.to(_F64) - self.shift
        for f in range(self.folds):
            m = fold == f
            if not bool(m.any()):
                continue
            Xf = X[m]
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
        ts = [self.n, self.sx, self.sxx, *self.sy.values(), *self.sxy.values(), *self.syy.values(), *self.rows,
              *self.row_fold, *(t for v in self.row_y.values() for t in v)]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @property
    def keys(self) -> list:
        return list(self.row_y if self.in_rows else self.sy)

    # -- the factorisations ------------------------------------------------------------------------------------
    def _factor(self, folds: list[int]) -> _Factor:
        if self.in_rows:
            idx = torch.nonzero(torch.isin(self.row_fold[0], torch.as_tensor(folds))).squeeze(1)
            X = self.rows[0][idx].to(_F64)
            mu = X.mean(0)
            X -= mu
            std = _std((X * X).mean(0), mu)
            X /= std
            evals, U = torch.linalg.eigh(X @ X.T)
            return _Factor(folds, float(len(idx)), mu, std, evals, U, X, idx)
        i = torch.as_tensor(folds, dtype=torch.long)
        n = float(self.n[i].sum())
        mu = self.sx[i].sum(0) / n
        cxx = self.sxx[i].sum(0) - n * torch.outer(mu, mu)
        std = _std(torch.diagonal(cxx) / n, mu)
        evals, Q = torch.linalg.eigh(cxx / torch.outer(std, std))
        return _Factor(folds, n, mu, std, evals, Q)

    def _rotated(self, F: _Factor, key) -> tuple[Tensor, Tensor]:
        """(``C`` = the training cross-covariance in the factor's eigenbasis [m, e], ``ybar`` [e])."""
        if self.in_rows:
            Y = self.row_y[key][0][F.idx].to(_F64)
            ybar = Y.mean(0)
            return F.Q.T @ (Y - ybar), ybar
        ybar = self.sy[key][F.folds].sum(0) / F.n
        cxy = self.sxy[key][F.folds].sum(0) - F.n * torch.outer(F.mu, ybar)
        return F.Q.T @ (cxy / F.std[:, None]), ybar

    def _coef(self, F: _Factor, C: Tensor, l2: float) -> Tensor:
        """The map ``M`` [d, e] of one l2 (prediction ``ybar + (x - offset) @ M``)."""
        WC = C * F.weights(l2)[:, None]
        return (F.Z.T @ (F.Q @ WC) if F.Z is not None else F.Q @ WC) / F.std[:, None]

    def _heldout(self, F: _Factor, f: int):
        """Fold ``f``'s statistics in ``F``'s eigenbasis: ``H`` [m, m] and a function key -> (s, P [m, e])."""
        if self.in_rows:
            ho = torch.nonzero(self.row_fold[0] == f).squeeze(1)
            G = (((self.rows[0][ho].to(_F64) - F.mu) / F.std) @ F.Z.T) @ F.Q  # [n_f, m]

            def stats(key, ybar):
                R = self.row_y[key][0][ho].to(_F64) - ybar
                return float((R * R).sum()), G.T @ R
            return G.T @ G, stats
        n = float(self.n[f])
        sx = self.sx[f]
        cxx = self.sxx[f] - torch.outer(F.mu, sx) - torch.outer(sx, F.mu) + n * torch.outer(F.mu, F.mu)
        H = F.Q.T @ (cxx / torch.outer(F.std, F.std)) @ F.Q

        def stats(key, ybar):
            sy, sxy, syy = self.sy[key][f], self.sxy[key][f], float(self.syy[key][f])
            cxy = sxy - torch.outer(F.mu, sy) - torch.outer(sx, ybar) + n * torch.outer(F.mu, ybar)
            s = syy - 2 * float(ybar @ sy) + n * float(ybar @ ybar)
            return s, F.Q.T @ (cxy / F.std[:, None])
        return H, stats

    def _consolidate(self) -> None:
        """Row mode: one tensor per list (concatenated once per fit)."""
        if self.in_rows and len(self.rows) > 1:
            self.rows, self.row_fold = [torch.cat(self.rows)], [torch.cat(self.row_fold)]
            self.row_y = {k: [torch.cat(v)] for k, v in self.row_y.items()}

    # -- fitting -------------------------------------------------------------------------------------------------
    def fit_all(self, keys=None, grid=RIDGE_GRID) -> dict:
        """``{key: RidgeFit}`` for every target key: l2 chosen by cross-validation over the folds, refit on all
        folds; ``folds + 1`` eigendecompositions in all, shared by every key and l2."""
        grid = tuple(grid)
        keys = self.keys if keys is None else list(keys)
        used = [f for f in range(self.folds) if self.n[f] > 0]
        if not used:
            raise ValueError("ridge probe: no training rows")
        self._consolidate()
        sse = {key: torch.zeros(len(grid), dtype=_F64) for key in keys}
        do_cv = len(used) >= 2 and len(grid) > 1
        for f in used if do_cv else []:
            F = self._factor([g for g in used if g != f])
            H, stats = self._heldout(F, f)
            for key in keys:
                C, ybar = self._rotated(F, key)
                s, P = stats(key, ybar)
                a, HC = (C * P).sum(1), H * (C @ C.T)
                for j, l2 in enumerate(grid):
                    w = F.weights(l2)
                    sse[key][j] += s - 2 * float(w @ a) + float(w @ HC @ w)
            del F, H
        F = self._factor(used)
        out = {}
        for key in keys:
            cv = {l2: float(s) / float(self.n.sum()) for l2, s in zip(grid, sse[key])} if do_cv else {}
            best = grid[int(sse[key].argmin())] if do_cv else grid[len(grid) // 2]
            C, ybar = self._rotated(F, key)
            offset = F.mu if self.in_rows else self.shift + F.mu
            out[key] = RidgeFit(M=self._coef(F, C, best), offset=offset, ybar=ybar, l2=best, cv=cv)
        return out

    def fit(self, key, grid=RIDGE_GRID) -> "RidgeFit":
        """Choose l2 by cross-validation over the folds, refit on all folds (one key: see :meth:`fit_all`)."""
        return self.fit_all([key], grid)[key]


class RidgeFit:
    """A fitted ridge map: prediction ``ybar + (x - offset) @ M``; ``cv``: l2 -> held-out MSE per row."""

    def __init__(self, M: Tensor, offset: Tensor, ybar: Tensor, l2: float, cv: dict):
        self.M, self.offset, self.ybar, self.l2, self.cv = M, offset, ybar, l2, cv

    def predict(self, X: Tensor) -> Tensor:
        return self.ybar + (X.to(_F64) - self.offset) @ self.M


def pca_code(E: Tensor, dim: int, seed: int = 0, chunk: int = 4096, oversample: int = 16, power: int = 2,
             progress: bool = False) -> Tensor:
    """A code table ``E`` [V, e] centred and projected onto its top ``dim`` principal directions: [V, dim]
    (float32). Randomized SVD (Halko, Martinsson & Tropp 2011): a seeded Gaussian sketch of ``dim +
    oversample`` columns, ``power`` power iterations; ``E`` is read ``chunk`` rows at a time (a bfloat16
    table is never copied whole to float32). Distances between codes in the kept directions are unchanged.
    ``progress``: a tqdm bar over the passes through the table."""
    V, e = E.shape
    q = min(dim + oversample, e, V)
    parts = range(0, V, chunk)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(4 + 2 * power) * len(parts), desc=f"retrieval code: top {dim} PCs", unit="chunk",
                   leave=False, dynamic_ncols=True)
    mean32 = (sum(E[s:s + chunk].to(_F64).sum(0) for s in parts) / V).float()
    if bar is not None:
        bar.update(len(parts))

    def rows(s):
        if bar is not None:
            bar.update(1)
        return E[s:s + chunk].float() - mean32

    def times(B):  # (E - mean) @ B, [V, q]
        return torch.cat([rows(s) @ B for s in parts])

    def t_times(Y):  # (E - mean)^T @ Y, [e, q]
        return sum(rows(s).T @ Y[s:s + chunk] for s in parts)

    g = torch.Generator().manual_seed(int(seed) * 104729 + 7)
    Y = times(torch.randn(e, q, generator=g))
    for _ in range(power):
        Y = times(torch.linalg.qr(t_times(torch.linalg.qr(Y).Q)).Q)
    Qy = torch.linalg.qr(Y.to(_F64)).Q.float()
    _, _, Vt = torch.linalg.svd(t_times(Qy).T.to(_F64), full_matrices=False)
    code = times(Vt[:dim].T.float())
    if bar is not None:
        bar.close()
    return code


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
