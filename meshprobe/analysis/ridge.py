"""Streaming ridge classifiers: closed-form ridge regression on one-hot targets, fitted from sufficient
statistics streamed in float64, so memory is independent of the number of rows.

* **Classifier**: ridge regression on one-hot targets with an unpenalized intercept, predicted class = argmax
  of the scores (the model of ``sklearn.linear_model.RidgeClassifier``; its +-1 targets give the same argmax).
  Per feature space ``sum x`` [d] and ``sum x x^T`` [d, d] (shifted by the first batch's mean for precision),
  per task the class sums ``sum_{y=c} x`` [C, d] and class counts [C]. Tasks probing the same rows share
  ``sum x x^T``, so adding a task costs ``C d`` numbers, not ``d^2``.
* **Standardization**: features are z-scored with the streamed mean and population std (ddof=0, like
  ``StandardScaler``) derived from the same sums; zero-variance features keep scale 1.
* **Ridge strength**: ``alpha = l2 * trace(Zc^T Zc) / d`` with ``Zc`` the centered, standardized training
  features; with standardization that is ``l2 * n_train`` (so ``l2`` is per-sample and does not depend on N or
  d). ``l2_relative=False`` uses ``alpha = l2`` exactly (sklearn's ``alpha``). Default ``l2 = 1e-2``.
* Classes never seen in training are never predicted.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["MultiTaskRidgeProbe", "StreamingRidgeProbe"]

_F64 = torch.float64


class MultiTaskRidgeProbe:
    """Ridge classifiers for several label tasks on ONE feature space, fitted from streamed statistics.

    ``partial_fit(X [n, d], {task: y [n]})`` accumulates (all tasks must label the same rows, labels in
    ``[0, C_task)``); ``finalize()`` solves ``(Zc^T Zc + alpha I) W = Zc^T Yc`` (Z standardized, c centered,
    Y one-hot) in float64 by Cholesky; ``predict`` / ``scores`` then work on raw features. See the module doc
    for the standardization and ``alpha`` rules. State size is independent of the number of rows / calls.
    """

    def __init__(self, d: int, n_classes: Mapping[str, int], l2: float = 1e-2, *, l2_relative: bool = True,
                 standardize: bool = True, dtype: torch.dtype = _F64, device: torch.device | str | None = None):
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        if not n_classes or any(int(c) < 1 for c in n_classes.values()):
            raise ValueError(f"n_classes must map task names to class counts >= 1, got {dict(n_classes)}")
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.d = int(d)
        self.n_classes = {k: int(v) for k, v in n_classes.items()}
        self.l2, self.l2_relative, self.standardize = float(l2), bool(l2_relative), bool(standardize)
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.n = 0
        self._shift: Tensor | None = None
        self._s1: Tensor | None = None
        self._s2: Tensor | None = None
        self._csum: dict[str, Tensor] = {}
        self._ccnt: dict[str, Tensor] = {}
        self._W: Tensor | None = None  # [d, sum C] raw-feature weights after finalize
        self._b: Tensor | None = None  # [sum C]
        self.alpha_: float | None = None

    # -- accumulation -------------------------------------------------------------------------------------------
    def _alloc(self, X: Tensor) -> None:
        dev = self.device or X.device
        self.device = dev
        d = self.d
        self._shift = X.to(dev, self.dtype).mean(0)
        self._s1 = torch.zeros(d, dtype=self.dtype, device=dev)
        self._s2 = torch.zeros(d, d, dtype=self.dtype, device=dev)
        for k, c in self.n_classes.items():
            self._csum[k] = torch.zeros(c, d, dtype=self.dtype, device=dev)
            self._ccnt[k] = torch.zeros(c, dtype=self.dtype, device=dev)

    def partial_fit(self, X: Tensor, labels: Mapping[str, Tensor]) -> "MultiTaskRidgeProbe":
        """Accumulate training rows ``X`` [n, d] with labels ``{task: LongTensor [n]}`` for every task."""
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X must be [n, {self.d}], got {tuple(X.shape)}")
        if set(labels) != set(self.n_classes):
            raise ValueError(f"labels must have exactly the tasks {sorted(self.n_classes)}, got {sorted(labels)}")
        if X.shape[0] == 0:
            return self
        if self._s2 is None:
            self._alloc(X)
        self._W = None  # refit needed
        x = X.detach().to(self.device, self.dtype) - self._shift
        ys = {}
        for k, y in labels.items():
            y = torch.as_tensor(y).to(self.device).long().reshape(-1)
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"task {k!r}: {y.shape[0]} labels for {x.shape[0]} rows")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_classes[k]):
                raise ValueError(f"task {k!r}: labels must lie in [0, {self.n_classes[k]})")
            ys[k] = y
        self.n += x.shape[0]
        self._s1 += x.sum(0)
        self._s2 += x.T @ x
        for k, y in ys.items():
            self._csum[k].scatter_add_(0, y[:, None].expand(-1, self.d), x)  # index_add_ is slow with repeats
            self._ccnt[k] += torch.bincount(y, minlength=self.n_classes[k]).to(self.dtype)
        return self

    # -- solve --------------------------------------------------------------------------------------------------
    def finalize(self) -> "MultiTaskRidgeProbe":
        """Solve the ridge systems of all tasks at once (one Cholesky factorization)."""
        if self.n == 0:
            raise ValueError("no training rows: call partial_fit first")
        n = float(self.n)
        s1 = self._s1
        mu = self._shift + s1 / n
        G = self._s2 - torch.outer(s1, s1) / n  # centered Gram sum (x-mu)(x-mu)^T
        G = 0.5 * (G + G.T)
        if self.standardize:
            var = G.diagonal().clamp_min(0) / n
            tiny = var.max().clamp_min(torch.finfo(self.dtype).tiny) * 1e-12
            scale = torch.where(var > tiny, var.sqrt(), torch.ones_like(var))
        else:
            scale = torch.ones(self.d, dtype=self.dtype, device=self.device)
        Gz = G / torch.outer(scale, scale)
        tasks = list(self.n_classes)
        ybar = torch.cat([self._ccnt[k] / n for k in tasks])  # [sum C]
        B = torch.cat([self._csum[k].T for k in tasks], dim=1) - torch.outer(s1, ybar)  # Xc^T Yc  [d, sum C]
        Bz = B / scale[:, None]
        alpha = self.l2 * (float(Gz.diagonal().sum()) / self.d if self.l2_relative else 1.0)
        self.alpha_ = alpha
        A = Gz + alpha * torch.eye(self.d, dtype=self.dtype, device=self.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            Wz = torch.cholesky_solve(Bz, L)
        else:  # singular (alpha = 0 and rank-deficient): minimum-norm solution
            Wz = torch.linalg.pinv(A, hermitian=True) @ Bz
        W = Wz / scale[:, None]
        self._W = W
        self._b = ybar - mu @ W
        seen = torch.cat([self._ccnt[k] > 0 for k in tasks])
        self._b = torch.where(seen, self._b, torch.full_like(self._b, float("-inf")))  # never predict unseen
        self._slices = {}
        o = 0
        for k in tasks:
            self._slices[k] = slice(o, o + self.n_classes[k])
            o += self.n_classes[k]
        return self

    def _need_fit(self) -> None:
        if self._W is None:
            self.finalize()

    def scores(self, X: Tensor, task: str | None = None, chunk: int = 8192) -> dict[str, Tensor] | Tensor:
        """Decision scores ``x W + b`` (float64) per task, [n, C_task]; one task's tensor if ``task`` given."""
        self._need_fit()
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X must be [n, {self.d}], got {tuple(X.shape)}")
        W, b = self._W, self._b
        if task is not None:
            W, b = W[:, self._slices[task]], b[self._slices[task]]
        parts = [X[i:i + chunk].detach().to(self.device, self.dtype) @ W + b for i in range(0, X.shape[0], chunk)]
        S = torch.cat(parts) if parts else torch.empty(0, W.shape[1], dtype=self.dtype, device=self.device)
        if task is not None:
            return S
        return {k: S[:, sl] for k, sl in self._slices.items()}

    def predict(self, X: Tensor) -> dict[str, Tensor]:
        """Predicted class per task: ``{task: LongTensor [n]}``."""
        return {k: s.argmax(1) for k, s in self.scores(X).items()}

    def class_counts(self, task: str) -> Tensor:
        """Training label histogram of a task (float64 [C])."""
        return self._ccnt[task]

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators and fitted weights (independent of the number of rows)."""
        ts = [self._shift, self._s1, self._s2, self._W, self._b, *self._csum.values(), *self._ccnt.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class StreamingRidgeProbe(MultiTaskRidgeProbe):
    """Single-task streaming ridge classifier (``RidgeClassifier`` equivalent, constant memory).

    ``partial_fit(X [n, d], y [n])``: labels in ``[0, n_classes)``; rows with ``y < 0`` are dropped.
    ``finalize()`` solves; ``predict(X) -> LongTensor [n]``; ``score(X, y) -> accuracy`` (rows with y < 0
    ignored). After finalize, ``coef_`` [d, C] and ``intercept_`` [C] act on raw (unstandardized) features and
    ``alpha_`` is the absolute ridge used on the standardized problem.
    """

    _T = "y"

    def __init__(self, d: int, n_classes: int, l2: float = 1e-2, *, l2_relative: bool = True,
                 standardize: bool = True, dtype: torch.dtype = _F64, device: torch.device | str | None = None):
        super().__init__(d, {self._T: int(n_classes)}, l2, l2_relative=l2_relative, standardize=standardize,
                         dtype=dtype, device=device)

    def partial_fit(self, X: Tensor, y: Tensor) -> "StreamingRidgeProbe":  # type: ignore[override]
        y = torch.as_tensor(y).long().reshape(-1)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"{y.shape[0]} labels for {X.shape[0]} rows")
        keep = (y >= 0).to(X.device)
        return super().partial_fit(X[keep], {self._T: y.to(X.device)[keep]})

    def scores(self, X: Tensor, task: str | None = None, chunk: int = 8192) -> Tensor:  # type: ignore[override]
        return super().scores(X, self._T, chunk)

    def predict(self, X: Tensor) -> Tensor:  # type: ignore[override]
        return self.scores(X).argmax(1)

    def score(self, X: Tensor, y: Tensor) -> float:
        """Accuracy on ``(X, y)``; rows with ``y < 0`` are ignored."""
        y = torch.as_tensor(y).long().reshape(-1)
        keep = y >= 0
        if int(keep.sum()) == 0:
            return float("nan")
        pred = self.predict(X[keep.to(X.device)]).cpu()
        return float((pred == y[keep].cpu()).double().mean())

    @property
    def class_counts_(self) -> Tensor:
        return self._ccnt[self._T]

    @property
    def coef_(self) -> Tensor:
        self._need_fit()
        return self._W

    @property
    def intercept_(self) -> Tensor:
        self._need_fit()
        return self._b
