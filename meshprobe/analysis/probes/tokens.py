"""Token-information probes: how well is the token at ``x_{i+k}`` decodable from a state at position ``i``?

Two probes per (state, offset ``k``), both trained and tested on disjoint *sequences*:

1. **Balanced multinomial logistic probe** (the default read-out). Targets: the ``C`` most frequent target
   types of the training rows (``C = max_classes``; ties: smaller id first; a class with fewer than
   ``min_test_per_class`` test rows or fewer than 2 training rows is dropped). Rows whose target is another type
   are not used (no catch-all class). Every class gets the same number of training rows ``m_train = min(cap,
   rarest class's training rows)`` and the same number of test rows ``m_test`` (likewise), so chance is exactly
   ``1 / C``. Which rows: per class the ones with the smallest seeded hash of (sequence, position) -- a
   deterministic, order-independent uniform sample. Softmax cross-entropy + L2 on z-scored features, L2 chosen
   by cross-validation over training sequences (:mod:`meshprobe.analysis.probes.softmax`). Reported: held-out accuracy
   with a 95% bootstrap CI over test sequences; held-out cross-entropy (nats) and its gain over the class prior
   (the training class frequencies: uniform, so the prior's cross-entropy is ``log C``), with a CI.
2. **Embedding-retrieval probe**: ridge regression from the state onto a fixed code of the target token
   (``embedding`` [V, e], by default the model's input embedding in ``meshprobe analyze``; ``None``: a fixed
   Gaussian code [V, d], N(0, 1/d), drawn from ``seed``, V = max token id + 1) on *every* training position, no
   class cut; streamed (the rows while they are fewer than d, else XᵀX / XᵀY per fold) and solved on one
   eigendecomposition per training set shared by every offset and L2 (:mod:`meshprobe.analysis.probes.retrieval`).
   An embedding wider than ``max_code_dim`` (256) is replaced by its top ``max_code_dim`` principal components
   (centred; :func:`~meshprobe.analysis.probes.retrieval.pca_code`): XᵀY stays ``d x 256`` per offset and the
   nearest-code search over V types costs ``V x 256`` per row; R² and retrieval are then measured in that
   subspace (``retrieval_code`` says so). Reported on held-out rows
   (a seeded sample of at most ``retrieval_test_rows`` test positions): R² and top-1 / top-5 retrieval of the
   target among all V codes, with bootstrap CIs. Baseline: ``retrieval_majority``, the share of those rows
   whose target is the most frequent training type (what always answering that type scores). A random code is
   not a linear image of the state when types outnumber dimensions, so retrieval is meaningful with the
   model's own embedding; use the logistic probe for a code-free read-out.

**Increment over the current token** (:func:`token_probe_increment`): what a state tells about ``x_{i+k}``
beyond what a base state (``h_emb``, which holds exactly ``x_i``) tells. Definition: the same balanced logistic
probe, on the same rows, fitted on the concatenation ``[base, state]`` versus on ``base`` alone; the increment
is the drop in held-out cross-entropy ``CE(base) - CE([base, state])`` (nats; the conditional information the
probe extracts from the state beyond the base) and the accuracy gain, each with a paired bootstrap CI over test
sequences. The joint probe nests the base probe, so a state that only re-encodes ``x_i`` scores ~0, and one that
lost ``x_i`` but kept nothing else cannot score below 0 by more than estimation noise (a plain difference of two
probes' accuracies would mix "forgot x_i" with "knows nothing about x_{i+k}").

Streaming (used by ``meshprobe analyze``): a :class:`TokenProbePlan` is computed from the token ids alone
(they are known up front: N x S ints); it fixes the classes, rows, split and folds for every offset. Each state
gets a :class:`TokenProbeAccumulator`; ``update(seq_ids, features)`` is called per batch and keeps only (a) the
planned rows' features (at most ``offsets * C * (cap_train + cap_test) + retrieval_test_rows`` rows, shared
across offsets) and (b) the ridge statistics, so memory does not grow with N. Same tokens, seed and thread
count -> same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from meshprobe.analysis.probes.retrieval import RidgeStats, pca_code, retrieval_ranks
from meshprobe.analysis.probes.softmax import L2_GRID, fit_softmax_cv
from meshprobe.analysis.stats import bootstrap_ratio_ci, cv_fold, is_test_sequence, sequence_sums, unit_hash

__all__ = [
    "DEFAULT_OFFSETS",
    "gaussian_code",
    "TokenProbePlan",
    "TokenProbeAccumulator",
    "token_probe",
    "token_probe_increment",
]

#: default target offsets k (x_{i+k}) for the analyze command
DEFAULT_OFFSETS: tuple[int, ...] = (0, -1, -2, -4, -8, 1)

BASELINE_NOTE = ("chance = 1/classes (balanced: equal train and test rows per class, the most frequent target "
                 "types, no catch-all class); ce_gain = prior_ce - ce in nats, prior = training class frequencies "
                 "(uniform, so prior_ce = log classes); retrieval_majority = top-1 of always answering the most "
                 "frequent training type; CIs: 95% bootstrap over test sequences")


def gaussian_code(vocab_size: int, dim: int, seed: int = 0) -> Tensor:
    """A fixed random code per token type: [vocab_size, dim], entries N(0, 1/dim), drawn from ``seed``."""
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    return torch.randn(vocab_size, dim, generator=g) / math.sqrt(dim)


def _code_table(embedding: Tensor | None, V: int, code_dim: int, max_code_dim: int, seed: int,
                progress: bool = False) -> tuple[Tensor, str]:
    """The retrieval code [V', e] and its name: a Gaussian code, the embedding, or (wider than ``max_code_dim``)
    the embedding on its top ``max_code_dim`` principal directions."""
    if embedding is None:
        return gaussian_code(V, code_dim, seed), "gaussian"
    E = embedding.detach().cpu()
    if E.shape[1] <= max_code_dim:
        return E.float(), "embedding"
    return pca_code(E, max_code_dim, seed, progress=progress), f"embedding, top {max_code_dim} principal components"


def _balanced(cls: np.ndarray, prio: np.ndarray, C: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``m = min(cap, min class count)`` rows per class (smallest ``prio`` first) among rows with
    ``cls >= 0``, and their classes (grouped by class)."""
    idx = np.nonzero(cls >= 0)[0]
    c = cls[idx]
    counts = np.bincount(c, minlength=C)
    m = int(min(cap, counts.min())) if C else 0
    order = np.lexsort((prio[idx], c))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = order[(np.arange(len(order)) - starts[c[order]]) < m]
    return idx[keep], c[keep]


@dataclass
class OffsetRows:
    """The planned logistic-probe rows of one offset: ``classes`` [C] type ids (most frequent first);
    ``train`` / ``test`` index the plan's row table, ``train_y`` / ``test_y`` are class indices."""
    offset: int
    classes: Tensor
    train: Tensor
    train_y: Tensor
    test: Tensor
    test_y: Tensor


class TokenProbePlan:
    """Rows, classes, split and folds of the token probes for ``tokens`` [N, S] and target ``offsets``,
    a function of the tokens and ``seed`` only (see the module docstring). ``embedding`` [V, e]: the retrieval
    code (``None``: :func:`gaussian_code` with ``e = code_dim``, V = max token id + 1; wider than
    ``max_code_dim``: its top principal components, a progress bar when ``progress``). ``ignore`` (bool [N]):
    sequences used neither for training nor for testing (e.g. test windows that share an n-gram with a training
    window, :func:`meshprobe.analysis.stats.shares_ngram`)."""

    def __init__(self, tokens: Tensor, offsets: Sequence[int] = DEFAULT_OFFSETS, *, max_classes: int = 64,
                 seed: int = 0, embedding: Tensor | None = None, test_fraction: float = 0.3,
                 max_train_per_class: int = 128, max_test_per_class: int = 128, min_test_per_class: int = 4,
                 retrieval_test_rows: int = 4096, folds: int = 3, code_dim: int = 128, max_code_dim: int = 256,
                 ignore=None, progress: bool = False):
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"tokens must be an integer [N, S] tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        self.tokens = tokens.long()
        N, S = self.tokens.shape
        self.N, self.S, self.seed, self.folds = N, S, int(seed), int(folds)
        self.offsets = tuple(int(k) for k in offsets)
        if not self.offsets or max(abs(k) for k in self.offsets) >= S:
            raise ValueError(f"offsets {self.offsets} need sequences longer than {S} tokens")
        seq = np.arange(N)
        self.is_test = torch.from_numpy(is_test_sequence(seq, test_fraction, seed))
        self.ignore = torch.zeros(N, dtype=torch.bool) if ignore is None else torch.as_tensor(ignore, dtype=torch.bool)
        if self.ignore.shape != (N,):
            raise ValueError(f"ignore must be a bool tensor of {N} entries, one per sequence")
        self.is_train = ~self.is_test & ~self.ignore
        self.is_test = self.is_test & ~self.ignore
        if not bool(self.is_train.any()) or not bool(self.is_test.any()):
            raise ValueError(f"{N} sequences: the split by sequence (test_fraction={test_fraction}) leaves no "
                             "train or no test sequence; give more sequences")
        self.fold = torch.from_numpy(cv_fold(seq, max(folds, 1), seed))
        V = int(self.tokens.max()) + 1
        self.code, self.code_name = _code_table(embedding, V, code_dim, max_code_dim, seed, progress)
        if int(self.tokens.min()) < 0 or V > self.code.shape[0]:
            raise ValueError(f"token ids must lie in [0, {self.code.shape[0]}) (the code table's rows)")
        self.max_classes = int(max_classes)
        flat = seq[:, None] * S + np.arange(S)
        self._prio = unit_hash(flat, seed, "row")  # [N, S]
        caps = (max_train_per_class, max_test_per_class, min_test_per_class)
        wanted = {k: self._select(k, *caps) for k in self.offsets}
        lo, hi = self.common_positions
        test_flat = flat[self.is_test.numpy(), lo:hi].ravel()
        pr = self._prio.ravel()[test_flat]
        ret = np.sort(test_flat[np.argsort(pr, kind="stable")[:retrieval_test_rows]])
        self.rows = np.unique(np.concatenate([ret] + [np.concatenate([a, b]) for a, _, b, _, _ in wanted.values()]))
        self.retrieval_rows = torch.from_numpy(np.searchsorted(self.rows, ret))
        self.by_offset = {k: OffsetRows(k, torch.from_numpy(cl), torch.from_numpy(np.searchsorted(self.rows, a)),
                                        torch.from_numpy(ya), torch.from_numpy(np.searchsorted(self.rows, b)),
                                        torch.from_numpy(yb))
                          for k, (a, ya, b, yb, cl) in wanted.items()}
        self._seq_start = np.searchsorted(self.rows, seq * S)
        self._seq_end = np.searchsorted(self.rows, (seq + 1) * S)

    @property
    def common_positions(self) -> tuple[int, int]:
        """Positions ``[lo, hi)`` where every offset's target exists (the retrieval probe's rows)."""
        return max(0, -min(self.offsets)), self.S - max(0, max(self.offsets))

    def _select(self, k: int, cap_tr: int, cap_te: int, min_te: int):
        S, V = self.S, self.code.shape[0]
        pos = np.arange(max(0, -k), S - max(0, k))
        tgt = self.tokens[:, pos + k].numpy()
        test = np.broadcast_to(self.is_test.numpy()[:, None], tgt.shape)
        train = np.broadcast_to(self.is_train.numpy()[:, None], tgt.shape)
        counts = np.bincount(tgt[train], minlength=V)
        order = np.lexsort((np.arange(V), -counts))[: self.max_classes]
        order = order[counts[order] >= 2]
        test_counts = np.bincount(tgt[test], minlength=V)
        classes = order[test_counts[order] >= min_te]
        if len(classes) < 2:
            raise ValueError(f"offset {k}: fewer than 2 target types with >= {min_te} test rows; give more data")
        lut = np.full(V, -1, dtype=np.int64)
        lut[classes] = np.arange(len(classes))
        cls = lut[tgt]
        flat = (np.arange(self.N)[:, None] * S + pos).astype(np.int64)
        prio = self._prio[:, pos]
        out = []
        for split, cap in ((train, cap_tr), (test, cap_te)):
            c = np.where(split, cls, -1).ravel()
            i, y = _balanced(c, prio.ravel(), len(classes), cap)
            out += [flat.ravel()[i], y]
        return out[0], out[1], out[2], out[3], classes

    def seq_of(self, idx: Tensor) -> Tensor:
        """Sequence id of rows ``idx`` of the row table."""
        return torch.from_numpy(self.rows[idx.numpy()] // self.S)

    def accumulator(self) -> "TokenProbeAccumulator":
        return TokenProbeAccumulator(self)


class TokenProbeAccumulator:
    """What the token probes need from one state, accumulated batch by batch (memory independent of N)."""

    def __init__(self, plan: TokenProbePlan):
        self.plan = plan
        self.X: Tensor | None = None  # [rows, d] planned rows' features (float32)
        self.filled: Tensor = torch.zeros(len(plan.rows), dtype=torch.bool)
        self.ridge = RidgeStats(plan.folds)
        self._fits: dict = {}

    def update(self, seq_ids, features: Tensor) -> "TokenProbeAccumulator":
        """Add sequences ``seq_ids`` [B] (indices into the plan's tokens) with their features [B, S, d]."""
        p = self.plan
        seq = torch.as_tensor(seq_ids, dtype=torch.long).reshape(-1)
        features = features.detach().float().cpu()
        if features.dim() != 3 or features.shape[:2] != (len(seq), p.S):
            raise ValueError(f"features must be [{len(seq)}, {p.S}, d], got {tuple(features.shape)}")
        if self.X is None:
            self.X = torch.zeros(len(p.rows), features.shape[2])
        s = seq.numpy()
        lens = p._seq_end[s] - p._seq_start[s]
        idx = np.concatenate([np.arange(a, b) for a, b in zip(p._seq_start[s], p._seq_end[s])] or [np.zeros(0, int)])
        b = np.repeat(np.arange(len(s)), lens)
        it = torch.from_numpy(idx.astype(np.int64))
        self.X[it] = features[torch.from_numpy(b), torch.from_numpy(p.rows[idx] % p.S)]
        self.filled[it] = True
        train = p.is_train[seq]
        if bool(train.any()):
            lo, hi = p.common_positions
            X = features[train, lo:hi].reshape(-1, features.shape[2])
            fold = p.fold[seq[train]].repeat_interleave(hi - lo)
            tok = p.tokens[seq[train]]
            targets = {k: p.code[tok[:, lo + k:hi + k].reshape(-1)] for k in p.offsets}
            self.ridge.add(X, fold, targets)
        self._fits.clear()
        return self

    def nbytes(self) -> int:
        return (0 if self.X is None else self.X.numel() * 4) + self.ridge.nbytes() + self.filled.numel()

    def _check(self) -> None:
        if self.X is None or not bool(self.filled.all()):
            raise ValueError("token probe: not every planned sequence was passed to update()")

    def logistic(self, offset: int, l2: float | None = None) -> tuple[dict, dict]:
        """(result dict, per-test-row arrays) of the balanced logistic probe; cached until the next update.
        ``l2``: use this L2 strength instead of choosing it by cross-validation."""
        key = ("lr", offset, l2)
        if key not in self._fits:
            self._check()
            self._fits[key] = _logistic(self.plan, self.X, offset, l2)
        return self._fits[key]

    def retrieval(self, offset: int) -> dict:
        """Result dict of the embedding-retrieval probe (the ridge maps of every offset are fitted together, on
        shared factorisations, at the first call; cached until the next update)."""
        self._check()
        if "ridge" not in self._fits:
            self._fits["ridge"] = self.ridge.fit_all(self.plan.offsets)
        return _retrieval(self.plan, self, offset)

    def result(self, offset: int, l2: float | None = None) -> dict:
        """The full :func:`token_probe` dict for this state and ``offset`` (``l2``: see :meth:`logistic`)."""
        out = dict(self.logistic(offset, l2)[0])
        out.update(self.retrieval(offset))
        out["offset"] = int(offset)
        out["baseline"] = BASELINE_NOTE
        return out

    def increment(self, base: "TokenProbeAccumulator", offset: int, l2: float | None = None,
                  base_l2: float | None = None) -> dict:
        """Increment over ``base`` (e.g. h_emb): see :func:`token_probe_increment`. ``l2`` / ``base_l2``: fixed
        L2 strengths of the joint and the base probe (``None``: chosen by cross-validation)."""
        if base.plan is not self.plan:
            raise ValueError("increment: both accumulators must come from the same plan")
        self._check()
        base._check()
        b_res, b_rows = base.logistic(offset, base_l2)
        j_res, j_rows = _logistic(self.plan, torch.cat([base.X, self.X], 1), offset, l2)
        return _increment(b_res, b_rows, j_res, j_rows, self.plan.seed)


def _ci(values: Tensor, seq: Tensor, seed: int) -> tuple[float, float]:
    num, den = sequence_sums(values, seq)
    return bootstrap_ratio_ci(num, den, seed=seed)


def _logistic(plan: TokenProbePlan, X: Tensor, offset: int, l2: float | None = None) -> tuple[dict, dict]:
    r = plan.by_offset[offset]
    C = len(r.classes)
    grid = L2_GRID if l2 is None else (float(l2),)
    probe = fit_softmax_cv(X[r.train], r.train_y, plan.seq_of(r.train), C, grid=grid, folds=plan.folds,
                           seed=plan.seed)
    with torch.no_grad():
        logits = probe.logits(X[r.test]).double()
    ce = F.cross_entropy(logits, r.test_y, reduction="none")
    prior = torch.bincount(r.train_y, minlength=C).double() / len(r.train_y)
    prior_ce = -prior.log()[r.test_y]
    correct = (logits.argmax(1) == r.test_y).double()
    seq = plan.seq_of(r.test)
    gain = prior_ce - ce
    res = {
        "accuracy": float(correct.mean()), "ci": _ci(correct, seq, plan.seed), "chance": 1.0 / C,
        "ce": float(ce.mean()), "prior_ce": float(prior_ce.mean()), "ce_gain": float(gain.mean()),
        "ce_gain_ci": _ci(gain, seq, plan.seed), "classes": C, "class_ids": r.classes.tolist(),
        "n_train": len(r.train), "n_test": len(r.test), "n_train_per_class": len(r.train) // C,
        "n_test_per_class": len(r.test) // C, "n_test_sequences": int(seq.unique().numel()), "l2": probe.l2,
    }
    return res, {"correct": correct, "ce": ce, "seq": seq}


def _retrieval(plan: TokenProbePlan, acc: TokenProbeAccumulator, offset: int) -> dict:
    fit = acc._fits["ridge"][offset]
    idx = plan.retrieval_rows
    flat = torch.from_numpy(plan.rows[idx.numpy()])
    seq = flat // plan.S
    target = plan.tokens[seq, flat % plan.S + offset]
    Y = plan.code[target].double()
    pred = fit.predict(acc.X[idx])
    sse = ((Y - pred) ** 2).sum(1)
    sst = ((Y - Y.mean(0)) ** 2).sum(1)
    lo, hi = bootstrap_ratio_ci(*[sequence_sums(v, seq)[0] for v in (sse, sst)], seed=plan.seed)
    hits = retrieval_ranks(pred, plan.code, target, k=5).double()
    counts = np.bincount(plan.tokens[plan.is_train].numpy().ravel(), minlength=plan.code.shape[0])
    return {
        "r2": float(1 - sse.sum() / sst.sum()), "r2_ci": (1 - hi, 1 - lo),
        "retrieval_top1": float(hits[:, 0].mean()), "retrieval_top1_ci": _ci(hits[:, 0], seq, plan.seed),
        "retrieval_top5": float(hits[:, 4].mean()), "retrieval_top5_ci": _ci(hits[:, 4], seq, plan.seed),
        "retrieval_majority": float((target == int(counts.argmax())).double().mean()),
        "retrieval_vocab": int(plan.code.shape[0]), "retrieval_code": plan.code_name,
        "n_retrieval_test": len(idx), "ridge_l2": fit.l2,
    }


def _increment(b_res: dict, b_rows: dict, j_res: dict, j_rows: dict, seed: int) -> dict:
    seq = b_rows["seq"]
    d_acc = j_rows["correct"] - b_rows["correct"]
    d_ce = b_rows["ce"] - j_rows["ce"]
    return {
        "accuracy_base": b_res["accuracy"], "accuracy_joint": j_res["accuracy"],
        "delta_accuracy": float(d_acc.mean()), "delta_accuracy_ci": _ci(d_acc, seq, seed),
        "ce_base": b_res["ce"], "ce_joint": j_res["ce"],
        "delta_ce": float(d_ce.mean()), "delta_ce_ci": _ci(d_ce, seq, seed),
        "chance": b_res["chance"], "classes": b_res["classes"], "n_test": b_res["n_test"],
        "l2_base": b_res["l2"], "l2_joint": j_res["l2"],
        "definition": "balanced logistic probe on [base, state] vs on base alone, same rows; delta_ce = "
                      "CE(base) - CE(joint) in nats, delta_accuracy = acc(joint) - acc(base); paired 95% bootstrap "
                      "CIs over test sequences",
    }


def _plan_and_fill(features: Sequence[Tensor], tokens: Tensor, offset: int, batch: int = 64, **kw):
    plan = TokenProbePlan(tokens, [offset], **kw)
    accs = []
    for f in features:
        f = torch.as_tensor(f)
        if f.dim() != 3 or f.shape[:2] != plan.tokens.shape:
            raise ValueError(f"features must be [N, S, d] matching tokens {tuple(plan.tokens.shape)}, "
                             f"got {tuple(f.shape)}")
        acc = plan.accumulator()
        for s in range(0, plan.N, batch):
            acc.update(torch.arange(s, min(s + batch, plan.N)), f[s:s + batch])
        accs.append(acc)
    return plan, accs


def token_probe(features: Tensor, tokens: Tensor, offset: int, *, max_classes: int = 64, seed: int = 0,
                embedding: Tensor | None = None, **plan_kw) -> dict:
    """Decodability of ``x_{i+offset}`` from ``features`` [N, S, d] (one state over N sequences) with token ids
    ``tokens`` [N, S]; ``offset`` 0 = x_i, -1 = x_{i-1}, +1 = x_{i+1}. Returns a dict with ``accuracy``,
    ``ci`` (95% bootstrap over test sequences, contains ``accuracy``), ``chance`` (= 1 / ``classes``), ``ce``,
    ``prior_ce``, ``ce_gain`` (+ ``ce_gain_ci``), ``classes``, ``class_ids``, ``n_train``, ``n_test``, ``l2``
    (balanced logistic probe) and ``r2`` (+ ``r2_ci``), ``retrieval_top1`` / ``retrieval_top5`` (+ CIs),
    ``retrieval_majority`` (embedding-retrieval probe onto ``embedding`` [V, e]; ``None``: a Gaussian code from
    ``seed``), ``baseline`` (what the baselines are). Extra keywords go to :class:`TokenProbePlan`
    (``test_fraction``, ``max_train_per_class``, ``max_test_per_class``, ``folds``, ...)."""
    plan, (acc,) = _plan_and_fill([features], tokens, offset, max_classes=max_classes, seed=seed,
                                  embedding=embedding, **plan_kw)
    return acc.result(offset)


def token_probe_increment(features: Tensor, base: Tensor, tokens: Tensor, offset: int, *, max_classes: int = 64,
                          seed: int = 0, **plan_kw) -> dict:
    """What ``features`` [N, S, d] tell about ``x_{i+offset}`` beyond ``base`` [N, S, d'] (e.g. h_emb): the
    balanced logistic probe on ``[base, features]`` against ``base`` alone on the same rows (module docstring).
    Returns ``delta_ce`` (nats) and ``delta_accuracy`` with paired CIs, and both probes' numbers."""
    plan, (acc, bacc) = _plan_and_fill([features, base], tokens, offset, max_classes=max_classes, seed=seed,
                                       **plan_kw)
    return acc.increment(bacc, offset)
