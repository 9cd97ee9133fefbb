"""Diagnostics of the MeSH paper (§2) as plain functions on tensors, plus streaming accumulators.

Everything here is model-independent: inputs are per-sample hidden states shaped ``[seq, d]`` (tokens of one
sample are the rows / "examples"), optionally with extra leading batch dimensions ``[..., seq, d]``.
All computations are done in float64 (inputs of any float dtype, on any device, are upcast); results are
float64 tensors on the input's device.

Choices the paper leaves open, and what this module does:

* ``relative_update``: Frobenius norms over the whole ``[seq, d]`` matrix of one sample, one number per sample.
* CKA: tokens of one sample are the examples; by default the plain (biased) HSIC estimator of Kornblith et
  al. 2019 on centered Gram matrices, as is usual; ``debiased=True`` everywhere switches to the unbiased HSIC
  (recommended as a check: with 256 tokens and d >= 256 the biased CKA of unrelated states is far from 0).
* RBF bandwidth: ``sigma = sigma_frac * median pairwise Euclidean distance``, computed separately for each
  matrix, over the distinct pairs ``i < j`` (Kornblith et al.'s reference code takes the median of the full
  ``n x n`` squared-distance matrix including the zero diagonal; for ``n = 256`` tokens the difference is
  negligible). ``sigma_frac`` defaults to 0.5; Kornblith et al. report fractions 0.2 / 0.4 / 0.8.
* Singular spectra: uncentered by default (the raw state matrix, as a "state" is fed to the next block);
  ``center=True`` subtracts the per-feature mean over tokens first. Padded with NaN past ``min(seq, d)``.
* Degenerate inputs (all-zero matrices, constant rows making a Gram matrix vanish) give NaN, never a silent 0
  or 1; ``RunningStats`` ignores NaN element-wise so such samples simply do not count.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "relative_update",
    "linear_cka",
    "rbf_cka",
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "cka_from_grams",
    "cka_matrix",
    "singular_spectrum",
    "effective_rank",
    "RunningStats",
]

_F64 = torch.float64


def _f64(x) -> Tensor:
    if not isinstance(x, Tensor):
        return torch.as_tensor(x, dtype=_F64)  # Python floats: no detour through float32
    return x.detach().to(_F64) if x.dtype != _F64 else x.detach()


def _check_matrix(name: str, x: Tensor) -> None:
    if x.ndim < 2:
        raise ValueError(f"{name} must be [..., n, d], got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# 1. Relative update magnitude
# ---------------------------------------------------------------------------------------------------------------
def relative_update(f_h: Tensor, h: Tensor) -> Tensor:
    """Relative update magnitude ``r(f, h) = 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F)`` (paper §2.1).

    ``f_h`` and ``h`` are ``[..., seq, d]``; the Frobenius norm runs over the last two dims, so the result is
    ``[...]`` (a 0-dim tensor for one ``[seq, d]`` sample). Range ``[0, 2]``: 0 for the identity, 2 for
    ``f(h) = -h``, 2/3 for ``f(h) = 2h``. 0/0 (both all-zero) is defined as 0 (no update).
    """
    _check_matrix("h", h)
    if f_h.shape != h.shape:
        raise ValueError(f"f_h and h must have the same shape, got {tuple(f_h.shape)} vs {tuple(h.shape)}")
    f_h, h = _f64(f_h), _f64(h)
    num = 2.0 * torch.linalg.matrix_norm(f_h - h, ord="fro")
    den = torch.linalg.matrix_norm(f_h, ord="fro") + torch.linalg.matrix_norm(h, ord="fro")
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


# ---------------------------------------------------------------------------------------------------------------
# 2. CKA
# ---------------------------------------------------------------------------------------------------------------
def _center_columns(x: Tensor) -> Tensor:
    return x - x.mean(dim=-2, keepdim=True)


def gram_linear(X: Tensor) -> Tensor:
    """Linear-kernel Gram matrix ``Xc Xc^T`` of column-centered ``X`` ([..., n, d] -> [..., n, n], float64).

    Centering the features first leaves the *centered* Gram matrix unchanged and improves precision.
    """
    _check_matrix("X", X)
    xc = _center_columns(_f64(X))
    return xc @ xc.transpose(-1, -2)


def _median_last(v: Tensor) -> Tensor:
    """Exact median over the last dim (mean of the two middle values for an even count)."""
    s = v.sort(dim=-1).values
    m = s.shape[-1]
    if m % 2:
        return s[..., m // 2]
    return 0.5 * (s[..., m // 2 - 1] + s[..., m // 2])


def _sq_dists(X: Tensor) -> Tensor:
    xc = _center_columns(_f64(X))  # distances are shift-invariant; centering reduces cancellation
    sq = (xc * xc).sum(-1)
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (xc @ xc.transpose(-1, -2))
    d2 = d2.clamp_min(0.0)
    n = d2.shape[-1]
    d2 = d2 * (1.0 - torch.eye(n, dtype=_F64, device=d2.device))  # exact zeros on the diagonal
    return d2


def gram_rbf(X: Tensor, sigma_frac: float = 0.5) -> Tensor:
    """RBF Gram matrix ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` ([..., n, d] -> [..., n, n], float64).

    Bandwidth: ``sigma = sigma_frac * median_{i<j} ||x_i - x_j||`` computed per matrix (per leading index), the
    rule of Kornblith et al. 2019 (a fraction of the median distance). It makes the kernel, hence RBF CKA,
    invariant to isotropic scaling and orthogonal transforms of ``X``. If the median distance is 0 (more than
    half of the token pairs identical) the result is NaN.
    """
    _check_matrix("X", X)
    if sigma_frac <= 0:
        raise ValueError(f"sigma_frac must be > 0, got {sigma_frac}")
    d2 = _sq_dists(X)
    n = d2.shape[-1]
    if n < 2:
        raise ValueError("RBF Gram matrix needs at least 2 rows (examples)")
    iu = torch.triu_indices(n, n, offset=1, device=d2.device)
    med = _median_last(d2[..., iu[0], iu[1]].sqrt())
    sigma2 = (sigma_frac * med) ** 2
    sigma2 = torch.where(sigma2 > 0, sigma2, torch.full_like(sigma2, float("nan")))
    return torch.exp(-d2 / (2.0 * sigma2[..., None, None]))


def center_gram(K: Tensor, debiased: bool = False) -> Tensor:
    """Double-centered Gram matrix ``H K H`` with ``H = I - 11^T/n`` ([..., n, n]).

    ``debiased=True``: the U-statistic centering of Kornblith et al.'s reference code (diagonal zeroed,
    column means taken over ``n - 2``), whose inner products give the unbiased HSIC of Song et al. 2012 (up to a
    constant). Needs ``n >= 4``.
    """
    K = _f64(K)
    if not debiased:
        return K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean((-1, -2), keepdim=True)
    n = K.shape[-1]
    if n < 4:
        raise ValueError("debiased CKA needs at least 4 examples")
    off = 1.0 - torch.eye(n, dtype=_F64, device=K.device)
    K = K * off
    means = K.sum(-2) / (n - 2)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    return (K - means.unsqueeze(-1) - means.unsqueeze(-2)) * off


def cka_from_grams(K: Tensor, L: Tensor, debiased: bool = False) -> Tensor:
    """CKA from two (uncentered) Gram matrices: ``<HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` ([..., n, n] -> [...]).

    Default: the plain (biased) HSIC estimator of Kornblith et al. 2019, the usual choice. Its value for
    *unrelated* representations is far from 0 when the Gram matrices are dominated by their diagonal (few
    examples relative to the dimension, or a narrow RBF kernel: e.g. ~0.8 linear / ~0.98 RBF for independent
    Gaussian [256, 1024] matrices). ``debiased=True`` uses the unbiased HSIC, which removes that floor (values
    near 0 for independent data; can be slightly negative). NaN if either centered Gram matrix is zero.
    """
    Kc, Lc = center_gram(K, debiased), center_gram(L, debiased)
    num = (Kc * Lc).sum((-1, -2))
    den = torch.linalg.matrix_norm(Kc) * torch.linalg.matrix_norm(Lc)
    return num / torch.where(den > 0, den, torch.full_like(den, float("nan")))


def linear_cka(X: Tensor, Y: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centered ``Xc, Yc``.

    ``X`` [..., n, d1], ``Y`` [..., n, d2] (rows = examples, e.g. tokens of one sample) -> [...] in [0, 1].
    Evaluated in feature space or via ``n x n`` Gram matrices, whichever is cheaper (identical value).
    Invariant to orthogonal transforms and isotropic scaling of either argument. NaN if a centered input is 0.
    ``debiased=True``: unbiased-HSIC version (see ``cka_from_grams``), computed from Gram matrices.
    """
    _check_matrix("X", X)
    _check_matrix("Y", Y)
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(f"X and Y need the same number of rows, got {X.shape[-2]} and {Y.shape[-2]}")
    if debiased:
        return cka_from_grams(gram_linear(X), gram_linear(Y), debiased=True)
    xc, yc = _center_columns(_f64(X)), _center_columns(_f64(Y))
    n, d1, d2 = xc.shape[-2], xc.shape[-1], yc.shape[-1]
    if n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2:  # Gram route is cheaper
        K, L = xc @ xc.transpose(-1, -2), yc @ yc.transpose(-1, -2)
        num = (K * L).sum((-1, -2))
        den = torch.linalg.matrix_norm(K) * torch.linalg.matrix_norm(L)
    else:
        xtx = xc.transpose(-1, -2) @ xc
        yty = yc.transpose(-1, -2) @ yc
        num = torch.linalg.matrix_norm(yc.transpose(-1, -2) @ xc) ** 2
        den = torch.linalg.matrix_norm(xtx) * torch.linalg.matrix_norm(yty)
    return num / torch.where(den > 0, den, torch.full_like(den, float("nan")))


def rbf_cka(X: Tensor, Y: Tensor, sigma_frac: float = 0.5, debiased: bool = False) -> Tensor:
    """RBF-kernel CKA (Kornblith et al. 2019): ``cka_from_grams(gram_rbf(X), gram_rbf(Y))``.

    ``X`` [..., n, d1], ``Y`` [..., n, d2] -> [...]. Bandwidth per matrix: ``sigma_frac`` x median pairwise
    Euclidean distance (see ``gram_rbf``). ``rbf_cka(X, X) == 1``. ``debiased``: see ``cka_from_grams``.
    """
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(f"X and Y need the same number of rows, got {X.shape[-2]} and {Y.shape[-2]}")
    return cka_from_grams(gram_rbf(X, sigma_frac), gram_rbf(Y, sigma_frac), debiased)


def cka_matrix(states: Sequence[Tensor] | Tensor, kind: str = "rbf", sigma_frac: float = 0.5,
               debiased: bool = False) -> Tensor:
    """Pairwise CKA between all states of one sample: ``S`` matrices [n, d_s] -> symmetric [S, S] (float64).

    ``states`` is a list of [n, d_s] tensors (widths may differ) or a tensor [..., S, n, d] (leading batch dims
    give [..., S, S]). Each state's centered Gram matrix is built once and normalized; the matrix is then one
    product ``F F^T`` of the flattened Grams (memory ``S n^2`` float64 per sample). ``kind``: "rbf" or "linear";
    ``debiased``: see ``cka_from_grams``.
    """
    if kind not in ("rbf", "linear"):
        raise ValueError(f"kind must be 'rbf' or 'linear', got {kind!r}")

    def gram(x: Tensor) -> Tensor:
        return gram_rbf(x, sigma_frac) if kind == "rbf" else gram_linear(x)

    if isinstance(states, Tensor):
        if states.ndim < 3:
            raise ValueError(f"states tensor must be [..., S, n, d], got {tuple(states.shape)}")
        G = center_gram(gram(states), debiased)  # [..., S, n, n]
    else:
        states = list(states)
        if not states:
            raise ValueError("states is empty")
        n = states[0].shape[-2]
        if any(s.ndim != 2 or s.shape[0] != n for s in states):
            raise ValueError("every state must be [n, d] with the same n")
        G = torch.stack([center_gram(gram(s), debiased) for s in states])  # [S, n, n]
    F = G.flatten(-2)
    norms = F.norm(dim=-1, keepdim=True)
    F = F / torch.where(norms > 0, norms, torch.full_like(norms, float("nan")))
    M = F @ F.transpose(-1, -2)
    return 0.5 * (M + M.transpose(-1, -2))


# ---------------------------------------------------------------------------------------------------------------
# 3. Spectra
# ---------------------------------------------------------------------------------------------------------------
def _svdvals(X: Tensor, center: bool) -> Tensor:
    _check_matrix("X", X)
    x = _f64(X)
    if center:
        x = _center_columns(x)
    return torch.linalg.svdvals(x)


def singular_spectrum(X: Tensor, top: int | None = 50, center: bool = False) -> Tensor:
    """Normalized singular values ``sigma_i / sigma_0`` (descending) of a state matrix [..., seq, d] -> [..., top].

    Uncentered by default (the paper does not say; the raw state is what the next block sees); ``center=True``
    subtracts the per-feature mean over tokens first. Entries ``i >= min(seq, d)`` do not exist and are padded
    with NaN (so ``nanmean`` / ``RunningStats`` skip them, and log plots show no fake zeros); genuine zero
    singular values of a rank-deficient matrix stay 0. ``top=None`` returns all ``min(seq, d)`` values.
    An all-zero matrix gives all NaN.
    """
    s = _svdvals(X, center)
    s0 = s[..., :1]
    r = s / torch.where(s0 > 0, s0, torch.full_like(s0, float("nan")))
    if top is None:
        return r
    k = r.shape[-1]
    if k >= top:
        return r[..., :top]
    pad = torch.full((*r.shape[:-1], top - k), float("nan"), dtype=_F64, device=r.device)
    return torch.cat([r, pad], dim=-1)


def effective_rank(X: Tensor, center: bool = False) -> Tensor:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p_i = sigma_i / sum_j sigma_j``,
    ``H(p) = -sum_i p_i log p_i`` (with ``0 log 0 = 0``), over the singular values of [..., seq, d] -> [...].

    Between 1 and ``rank(X)``; equals ``k`` for ``k`` equal nonzero singular values. Uncentered by default
    (same convention as ``singular_spectrum``). NaN for an all-zero matrix.
    """
    s = _svdvals(X, center)
    tot = s.sum(-1, keepdim=True)
    p = s / torch.where(tot > 0, tot, torch.ones_like(tot))
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    er = torch.exp(-plogp.sum(-1))
    return torch.where(tot.squeeze(-1) > 0, er, torch.full_like(er, float("nan")))


# ---------------------------------------------------------------------------------------------------------------
# Streaming accumulators
# ---------------------------------------------------------------------------------------------------------------
class RunningStats:
    """Streaming element-wise mean / variance (Welford; Chan et al. for batches) of tensors of a fixed shape.

    Use it for per-sample scalars, CKA matrices [S, S] or spectra [top]; memory is O(shape), independent of
    the number of samples. Accumulates in float64 on the device of the first update. NaN entries are ignored
    element-wise (``count`` is per element), so NaN-padded spectra or degenerate samples do not poison the
    means. ``std`` / ``var`` are the unbiased (ddof=1) estimates, like ``torch.std``; NaN where ``count < 2``.

    >>> rs = RunningStats(); [rs.update(x) for x in samples]; rs.mean, rs.std, rs.n
    """

    def __init__(self, shape: Sequence[int] | None = None, ignore_nan: bool = True):
        self.shape = None if shape is None else tuple(shape)
        self.ignore_nan = ignore_nan
        self.n = 0  # number of samples seen (update calls + batch rows)
        self._count: Tensor | None = None
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def _init(self, like: Tensor) -> None:
        if self.shape is None:
            self.shape = tuple(like.shape)
        if tuple(like.shape) != self.shape:
            raise ValueError(f"RunningStats expects samples of shape {self.shape}, got {tuple(like.shape)}")
        if self._mean is None:
            z = torch.zeros(self.shape, dtype=_F64, device=like.device)
            self._count, self._mean, self._m2 = z.clone(), z.clone(), z.clone()

    def update(self, x) -> "RunningStats":
        """Add one sample (tensor of the fixed shape, or a Python number for shape ())."""
        return self.update_batch(_f64(x).unsqueeze(0))

    def update_batch(self, xs) -> "RunningStats":
        """Add a batch of samples stacked along dim 0."""
        xs = _f64(xs)
        if xs.ndim == 0:
            raise ValueError("update_batch needs a leading batch dimension")
        self._init(xs[0])
        xs = xs.to(self._mean.device)
        mask = ~torch.isnan(xs) if self.ignore_nan else torch.ones_like(xs, dtype=torch.bool)
        nb = mask.sum(0).to(_F64)
        xz = torch.where(mask, xs, torch.zeros_like(xs))
        safe_nb = torch.where(nb > 0, nb, torch.ones_like(nb))
        mean_b = xz.sum(0) / safe_nb
        m2_b = torch.where(mask, (xs - mean_b) ** 2, torch.zeros_like(xs)).sum(0)
        self._combine(nb, mean_b, m2_b)
        self.n += xs.shape[0]
        return self

    def _combine(self, nb: Tensor, mean_b: Tensor, m2_b: Tensor) -> None:
        na = self._count
        tot = na + nb
        safe = torch.where(tot > 0, tot, torch.ones_like(tot))
        delta = mean_b - self._mean
        has = nb > 0
        self._mean = torch.where(has, self._mean + delta * nb / safe, self._mean)
        self._m2 = torch.where(has, self._m2 + m2_b + delta * delta * na * nb / safe, self._m2)
        self._count = tot

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Fold another accumulator (same shape) into this one, e.g. from another worker."""
        if other._mean is None:
            return self
        self._init(other._mean)
        self._combine(other._count.to(self._mean.device), other._mean.to(self._mean.device),
                      other._m2.to(self._mean.device))
        self.n += other.n
        return self

    def _need(self) -> None:
        if self._mean is None:
            raise ValueError("RunningStats has no samples yet")

    @property
    def count(self) -> Tensor:
        """Per-element number of non-NaN samples."""
        self._need()
        return self._count

    @property
    def mean(self) -> Tensor:
        self._need()
        return torch.where(self._count > 0, self._mean, torch.full_like(self._mean, float("nan")))

    @property
    def var(self) -> Tensor:
        self._need()
        c = self._count
        return torch.where(c > 1, self._m2 / torch.where(c > 1, c - 1, torch.ones_like(c)),
                           torch.full_like(c, float("nan")))

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator tensors (constant in the number of samples)."""
        if self._mean is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._count, self._mean, self._m2))

    def __repr__(self) -> str:
        return f"RunningStats(shape={self.shape}, n={self.n})"


def running_stats_of(samples: Iterable[Tensor]) -> RunningStats:
    """Convenience: a ``RunningStats`` fed with every tensor of an iterable (consumed lazily)."""
    rs = RunningStats()
    for x in samples:
        rs.update(x)
    return rs


__all__.append("running_stats_of")
