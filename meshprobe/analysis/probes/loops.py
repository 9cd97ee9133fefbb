"""Loop-differentiation probe: can a linear probe tell which loop step ``t`` a vector comes from?

If the K loop steps of a recursive model compute different things, the step should be decodable from the step's
output ``h^(t+1)`` and from its update ``f(h^(t)) - h^(t)``. Norms change with ``t`` (update magnitudes decay
across loops in base models), so a probe can read ``t`` from the norm alone; the probe therefore reads six
feature sets, each a multinomial logistic probe over the K steps (:mod:`meshprobe.analysis.probes.softmax`, L2 by
cross-validation over training sequences):

* ``state`` / ``update``: the raw vectors;
* ``state_unit`` / ``update_unit``: the vectors divided by their L2 norm (a shrinking norm cannot give t away);
* ``state_norm`` / ``update_norm``: one feature, the norm (the norm-only baseline).

Rows: a seeded, order-independent sample of positions (smallest hash of (sequence, position)), at most
``max_train_positions`` from training sequences and ``max_test_positions`` from test sequences (split by
sequence); every sampled position contributes one row per step, so the classes are balanced and chance is
exactly ``1 / K``. Each result carries the accuracy, a 95% bootstrap CI over test sequences, and a
label-permutation null: ``n_perm`` refits (at the chosen L2, without re-running the CV; solved jointly, see
``fit_softmax_many``) on training labels shuffled across rows, scored on the true test labels; ``null_mean``,
``null_q95`` and ``p_value = (1 + #{null >= accuracy}) / (1 + n_perm)`` (so at least 1 / (1 + n_perm)). For
a one-feature set with strong structure (the norm) the null is wide: a classifier fitted to shuffled labels can
still order the steps by chance.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from meshprobe.analysis.probes.softmax import fit_softmax_cv, fit_softmax_many
from meshprobe.analysis.stats import bootstrap_ratio_ci, is_test_sequence, sequence_sums, unit_hash

__all__ = ["LOOP_FEATURES", "LoopStepAccumulator", "loop_step_probe"]

LOOP_FEATURES = ("state", "update", "state_unit", "update_unit", "state_norm", "update_norm")


class LoopStepAccumulator:
    """Streams the loop-step probe's sampled positions for ``n_seq`` sequences of ``seq_len`` tokens and
    ``n_steps`` loop steps (memory: positions * K * d * 2 floats, independent of the number of sequences)."""

    def __init__(self, n_seq: int, seq_len: int, n_steps: int, *, seed: int = 0, test_fraction: float = 0.3,
                 max_train_positions: int = 512, max_test_positions: int = 512):
        if n_steps < 2:
            raise ValueError(f"the loop-step probe needs at least 2 loop steps, got {n_steps}")
        self.N, self.S, self.K, self.seed = int(n_seq), int(seq_len), int(n_steps), int(seed)
        seq = np.arange(self.N)
        test = is_test_sequence(seq, test_fraction, seed)
        if test.all() or not test.any():
            raise ValueError(f"{n_seq} sequences: the split by sequence leaves no train or no test sequence")
        flat = (seq[:, None] * self.S + np.arange(self.S)).astype(np.int64)
        prio = unit_hash(flat, seed, "loop-row")
        picked = []
        for split, cap in ((~test, max_train_positions), (test, max_test_positions)):
            f, p = flat[split].ravel(), prio[split].ravel()
            picked.append(f[np.argsort(p, kind="stable")[:cap]])
        self.rows = np.sort(np.concatenate(picked))
        self.is_test = torch.from_numpy(test[self.rows // self.S])
        self._start = np.searchsorted(self.rows, seq * self.S)
        self._end = np.searchsorted(self.rows, (seq + 1) * self.S)
        self.out: Tensor | None = None  # [rows, K, d]
        self.upd: Tensor | None = None
        self.filled = torch.zeros(len(self.rows), dtype=torch.bool)

    def update(self, seq_ids, outputs: Sequence[Tensor], updates: Sequence[Tensor]) -> "LoopStepAccumulator":
        """``outputs[t]`` = h^(t+1) and ``updates[t]`` = f(h^(t)) - h^(t), each [B, S, d], for sequences
        ``seq_ids`` [B]."""
        if len(outputs) != self.K or len(updates) != self.K:
            raise ValueError(f"expected {self.K} outputs and updates, got {len(outputs)} and {len(updates)}")
        s = torch.as_tensor(seq_ids, dtype=torch.long).reshape(-1).numpy()
        out = torch.stack([o.detach().float().cpu() for o in outputs], 2)  # [B, S, K, d]
        upd = torch.stack([u.detach().float().cpu() for u in updates], 2)
        if out.shape[:2] != (len(s), self.S) or upd.shape != out.shape:
            raise ValueError(f"outputs / updates must be [{len(s)}, {self.S}, d], got {tuple(out.shape)}")
        if self.out is None:
            self.out = torch.zeros(len(self.rows), self.K, out.shape[-1])
            self.upd = torch.zeros_like(self.out)
        idx = np.concatenate([np.arange(a, b) for a, b in zip(self._start[s], self._end[s])] or [np.zeros(0, int)])
        b = torch.from_numpy(np.repeat(np.arange(len(s)), self._end[s] - self._start[s]))
        pos = torch.from_numpy(self.rows[idx] % self.S)
        it = torch.from_numpy(idx.astype(np.int64))
        self.out[it], self.upd[it] = out[b, pos], upd[b, pos]
        self.filled[it] = True
        return self

    def nbytes(self) -> int:
        return 0 if self.out is None else 2 * self.out.numel() * 4

    def _features(self, kind: str) -> Tensor:
        V = self.out if kind.startswith("state") else self.upd
        norm = V.norm(dim=-1, keepdim=True)
        if kind.endswith("_unit"):
            return V / norm.clamp_min(1e-30)
        return norm if kind.endswith("_norm") else V

    def result(self, n_perm: int = 20, folds: int = 3, tick=None) -> dict:
        """Per feature set (``LOOP_FEATURES``): accuracy, ci, chance, null_mean, null_q95, p_value, l2, ...
        ``tick``: called with the feature set's name after each (progress)."""
        if self.out is None or not bool(self.filled.all()):
            raise ValueError("loop-step probe: not every sequence was passed to update()")
        seq = torch.from_numpy(self.rows // self.S)
        out = {}
        for kind in LOOP_FEATURES:
            out[kind] = _probe(self._features(kind), self.is_test, seq, self.K, n_perm, folds, self.seed, kind)
            if tick is not None:
                tick(kind)
        out["definition"] = ("multinomial logistic probe of the loop step t in [0, K) from h^(t+1) (state), "
                             "from f(h^(t)) - h^(t) (update), from both divided by their norm (_unit), and from "
                             "the norm alone (_norm, one feature); chance = 1/K; 95% bootstrap CI over test "
                             "sequences; null = refits on permuted training labels")
        return out


def _probe(V: Tensor, is_test: Tensor, seq: Tensor, K: int, n_perm: int, folds: int, seed: int, kind: str) -> dict:
    """One feature set ``V`` [rows, K, d]: rows of step t have label t."""
    n, _, d = V.shape
    y = torch.arange(K).repeat(n)
    X = V.reshape(n * K, d)
    g = seq.repeat_interleave(K)
    te = is_test.repeat_interleave(K)
    probe = fit_softmax_cv(X[~te], y[~te], g[~te], K, folds=folds, seed=seed)
    correct = (probe.predict(X[te]) == y[te]).double()
    num, den = sequence_sums(correct, g[te])
    acc = float(correct.mean())
    Ztr = (X[~te].float() - probe.mean) / probe.std
    Zte = (X[te].float() - probe.mean) / probe.std
    gen = torch.Generator().manual_seed(int(unit_hash([seed], 0, "perm-" + kind)[0] * 2 ** 31))
    null = []
    if n_perm > 0:
        ytr = y[~te]
        Yp = torch.stack([ytr[torch.randperm(len(ytr), generator=gen)] for _ in range(n_perm)], 1)
        Wb = fit_softmax_many(Ztr, Yp, K, probe.l2)  # [n_perm, d + 1, K]
        pred = (torch.einsum("nd,pdk->pnk", Zte, Wb[:, :-1]) + Wb[:, -1:, :]).argmax(-1)
        null = (pred == y[te]).double().mean(1).tolist()
    null_a = np.array(null)
    return {
        "accuracy": acc, "ci": bootstrap_ratio_ci(num, den, seed=seed), "chance": 1.0 / K,
        "null_mean": float(null_a.mean()) if null else None,
        "null_q95": float(np.quantile(null_a, 0.95)) if null else None,
        "p_value": float((1 + (null_a >= acc).sum()) / (1 + len(null))) if null else None,
        "n_perm": len(null), "l2": probe.l2, "n_features": d, "n_train": int((~te).sum()), "n_test": int(te.sum()),
    }


def loop_step_probe(outputs: Sequence[Tensor], updates: Sequence[Tensor], *, seed: int = 0, n_perm: int = 20,
                    folds: int = 3, **kw) -> dict:
    """Loop-differentiation probe on whole tensors: ``outputs[t]`` = h^(t+1) and ``updates[t]`` =
    f(h^(t)) - h^(t), each [N, S, d], t = 0..K-1. Returns ``{feature set: result}`` for ``LOOP_FEATURES`` (see
    the module docstring) plus ``definition``. Extra keywords go to :class:`LoopStepAccumulator`."""
    if not outputs or outputs[0].dim() != 3:
        raise ValueError("outputs must be a non-empty list of [N, S, d] tensors")
    N, S, _ = outputs[0].shape
    acc = LoopStepAccumulator(N, S, len(outputs), seed=seed, **kw)
    for s in range(0, N, 64):
        acc.update(torch.arange(s, min(s + 64, N)), [o[s:s + 64] for o in outputs], [u[s:s + 64] for u in updates])
    return acc.result(n_perm=n_perm, folds=folds)
