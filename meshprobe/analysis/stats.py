"""Small statistics helpers for the probes: deterministic hashing of sequence / position ids, the train/test
split by sequence, bootstrap confidence intervals over sequences, and a sampler of non-overlapping windows.

Everything here is a pure function of its inputs and a ``seed`` (no global RNG state is read or changed), so the
same seed gives the same numbers on any machine and in any batch order.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "hash_ids",
    "unit_hash",
    "is_test_sequence",
    "cv_fold",
    "sequence_sums",
    "bootstrap_ratio_ci",
    "sample_disjoint_windows",
    "shared_ngram_fraction",
    "shares_ngram",
]

_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_ids(ids, seed: int = 0, salt: str = "") -> np.ndarray:
    """A fixed pseudo-random uint64 per integer id (splitmix64 of id xor a mix of ``seed`` and ``salt``).
    Python's ``hash()`` is salted per process, this is not."""
    key = np.array([(int(seed) ^ (zlib.crc32(salt.encode()) << 32)) & _M64], dtype=np.uint64)
    key = _splitmix64(_splitmix64(key))[0]
    ids = np.asarray(ids, dtype=np.int64).view(np.uint64)
    return _splitmix64(ids ^ key)


def unit_hash(ids, seed: int = 0, salt: str = "") -> np.ndarray:
    """``hash_ids`` mapped to uniform floats in [0, 1)."""
    return (hash_ids(ids, seed, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_test_sequence(seq_ids, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Train/test split by sequence: a sequence is a test sequence iff its hash is below ``test_fraction``.
    Deterministic and independent of batch order (a bool array, one entry per id)."""
    return unit_hash(seq_ids, seed, "split") < test_fraction


def cv_fold(seq_ids, folds: int, seed: int = 0) -> np.ndarray:
    """Cross-validation fold in ``[0, folds)`` of each sequence id (seeded hash; independent of the test split)."""
    return np.minimum((unit_hash(seq_ids, seed, "cv-fold") * folds).astype(np.int64), folds - 1)


def sequence_sums(values: Tensor, seq_ids: Tensor, n_seq: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of ``values`` [n] or [n, m] and row counts, for rows tagged with ``seq_ids`` [n].
    Returns ``(sums [n_seq(, m)], counts [n_seq])`` over the sequences that occur (compressed, in id order)."""
    uniq, inv = torch.unique(seq_ids, return_inverse=True)
    k = len(uniq) if n_seq is None else n_seq
    v = values.double()
    sums = torch.zeros((k,) + tuple(v.shape[1:]), dtype=torch.float64).index_add_(0, inv, v)
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, torch.ones_like(inv, dtype=torch.float64))
    return sums, counts


def bootstrap_ratio_ci(num: Tensor, den: Tensor, *, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``sum(num) / sum(den)`` resampling *sequences* (rows of ``num`` / ``den``,
    one per sequence) with replacement. For an accuracy, ``num`` = correct rows per test sequence and ``den``
    = rows per test sequence; for a paired difference of two probes on the same rows, ``num`` = the per-sequence
    difference of their correct counts. Positions inside a sequence are correlated, hence whole sequences.

    The interval is widened if needed to contain the point estimate (a percentile interval of a ratio can miss it
    by a hair when the bootstrap distribution is skewed); with a single sequence it is the point itself."""
    num = torch.as_tensor(num, dtype=torch.float64).reshape(-1).numpy()
    den = torch.as_tensor(den, dtype=torch.float64).reshape(-1).numpy()
    point = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    n = len(num)
    if n < 2 or not np.isfinite(point):
        return point, point
    rng = np.random.default_rng([int(seed) & _M64, 0xB007])
    idx = rng.integers(0, n, size=(n_boot, n))
    stats = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-300)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(min(lo, point)), float(max(hi, point))


def sample_disjoint_windows(ids, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n`` windows of ``seq_len`` tokens from the token stream ``ids`` that share no position, at random
    places (a pure function of its inputs; int64 [n, seq_len]).

    Placement: draw ``n`` gaps ``g_1 <= ... <= g_n`` uniformly from ``[0, L - n * seq_len]`` (sorted draws with
    replacement) and start window j at ``g_j + j * seq_len``; windows are then returned in a seeded random
    order, so a split by window index is not a split by place in the stream. Raises ``ValueError`` if
    ``n * seq_len`` exceeds the stream length. Non-overlapping windows still share n-grams where the text itself
    repeats (see :func:`shared_ngram_fraction`)."""
    ids = np.asarray(ids)
    L = len(ids)
    if n < 0 or seq_len < 1:
        raise ValueError(f"need n >= 0 and seq_len >= 1 (got {n}, {seq_len})")
    if n * seq_len > L:
        raise ValueError(f"{n} disjoint windows of {seq_len} tokens need {n * seq_len} tokens; the stream has {L}")
    rng = np.random.default_rng([int(seed) & _M64, 0xD15])
    gaps = np.sort(rng.integers(0, L - n * seq_len + 1, size=n))
    starts = gaps + np.arange(n) * seq_len
    starts = starts[rng.permutation(n)]
    return np.asarray(ids[starts[:, None] + np.arange(seq_len)], dtype=np.int64)


def shares_ngram(windows_a, windows_b, n: int = 16) -> np.ndarray:
    """Bool [m]: does window j of ``windows_b`` [m, S] share at least one ``n``-gram with some window of
    ``windows_a`` [k, S]? (E.g. test windows against training windows: with ``TokenProbePlan(ignore=...)`` such
    test windows can be left out.)"""
    a = np.asarray(windows_a, dtype=np.int64)
    b = np.asarray(windows_b, dtype=np.int64)
    if b.shape[0] == 0 or a.shape[0] == 0 or a.shape[1] < n or b.shape[1] < n:
        return np.zeros(b.shape[0], dtype=bool)

    def grams(w: np.ndarray) -> np.ndarray:  # [rows, S - n + 1] hashes of every n-gram
        win = np.lib.stride_tricks.sliding_window_view(w, n, axis=1)
        h = np.zeros(win.shape[:2], dtype=np.uint64)
        for j in range(n):
            h = _splitmix64(h ^ win[..., j].astype(np.uint64))
        return h

    return np.isin(grams(b), grams(a)).any(axis=1)


def shared_ngram_fraction(windows_a, windows_b, n: int = 16) -> float:
    """Fraction of the windows in ``windows_b`` that share an ``n``-gram with ``windows_a`` (see
    :func:`shares_ngram`); 0 for no windows."""
    m = shares_ngram(windows_a, windows_b, n)
    return float(m.mean()) if len(m) else 0.0
