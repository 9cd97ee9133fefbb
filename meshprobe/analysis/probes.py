"""Streaming linear probes ("information overload" probes; this project's addition, not in the paper).

Question: which information does a hidden state (a loop iterate h^(t), a MeSH memory slot m_b, ...) carry?
Tasks, all read from the token ids of the sample:

* long-lived: the current token id (``current``), the token 1 and 2 positions back (``prev1``, ``prev2``);
* transient: the next token id (``next``);
* ``loop_index``: which loop iterate t a state comes from (features of all loop states pooled).

Design (every choice the paper leaves open):

* **Classifier**: the streaming ridge classifier of :mod:`meshprobe.analysis.ridge` (closed form on one-hot
  targets, standardized features, ``alpha = l2 * n_train``, default ``l2 = 1e-2``; memory independent of N).
* **Classes**: labels are integers in ``[0, C)``; token ids are mapped to at most ``C = max_classes``
  (default 256) classes by a ``TokenLabelMap``: the ``C - 1`` most frequent token ids of a frequency count
  (ties broken by smaller id) get their own class, every other id goes to one ``OTHER`` class (``C - 1``).
  OTHER counts as a class in accuracy; the chance baseline accounts for its size. Classes never seen in
  training are never predicted.
* **Same capacity everywhere**: every state and every token task uses the same ``l2``, the same label map and
  the same ``C``; every probe is linear on the full ``d``-dim state.
* **Rows**: for one sequence of length n, all token tasks use the common positions ``t in [2, n-2]`` (the rows
  where t-2 and t+1 exist), so they share one Gram matrix; sequences shorter than 4 tokens are skipped.
* **Split**: by sequence. A sequence is a test sequence iff ``hash(split_seed, seq_id) < test_fraction``
  (deterministic, order-independent), unless the caller passes ``split="train"|"test"``.
* **Control tasks** (Hewitt & Liang 2019): each token *type* (raw token id) is mapped to a label drawn from
  the task's label set ``[0, C)`` by a fixed seeded hash (splitmix64), so control labels are a deterministic
  function of the word type with no linguistic structure. As in Hewitt & Liang the label is drawn from the
  real task's label distribution (``TokenLabelMap.class_probs``, known from the frequency count, OTHER
  included), so both tasks have similar majority baselines; uniform if the map has no counts.
  Which word type: by default (``control_source="target"``) the token whose identity the task asks for,
  x_{t+offset} — the control replaces the task's structured type->label map (top-C ids + OTHER) by a random
  one over the same types, so real and control need the same information. ``control_source="current"`` uses
  the probed position's own token x_t for every task (Hewitt & Liang's literal "word at the probed
  position"): it measures how much the probe can memorize from the current token's identity, which nearly
  every state carries, so for prev/next tasks it mostly just shifts ``acc`` by a constant.
  Each task has its own map (seed derived from ``control_seed`` and the task name). The loop-index control maps
  the current token type to ``[0, K)``. ``selectivity = acc - control_acc``.
* **Chance**: majority-class baseline — the test accuracy of always predicting the most frequent training
  label. Because control labels are drawn per type, the control task's majority baseline differs from the real
  task's by a random amount; ``selectivity_vs_chance = (acc - chance) - (control_acc - control_chance)``
  is reported next to the plain ``selectivity``.
* **Test data**: either (a) a second streaming pass ``ProbeSuite.evaluate`` after ``finalize`` (exact,
  constant memory: only correct/total counts), or (b) when no second pass is made, a capped sample of test
  sequences kept in pass 1: sequences are kept by smallest ``hash(split_seed, seq_id)`` priority while the
  total kept tokens stay <= ``test_cap_tokens`` (default 8192 tokens; uniform over test sequences and
  independent of data order). Features are stored in their input dtype on CPU, so the cap costs
  ``test_cap_tokens * sum_s d_s * bytes`` (8192 x 8 states x 1024 x 4 B = 256 MiB for fp32).

Memory per probed state: ``(d^2 + 3 d) + n_tasks * (C d + C)`` float64 numbers (d=1024, 8 tasks incl.
controls, C=256: about 25 MiB).
"""
from __future__ import annotations

import bisect
import zlib
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from meshprobe.analysis.ridge import MultiTaskRidgeProbe, StreamingRidgeProbe

__all__ = [
    "TOKEN_TASKS",
    "MultiTaskRidgeProbe",
    "StreamingRidgeProbe",
    "TokenLabelMap",
    "ProbeSuite",
    "control_labels",
    "token_task_rows",
    "token_task_labels",
    "Tally",
    "probe_fields",
]

#: token tasks: name -> offset of the target token relative to the probed position t
TOKEN_TASKS: dict[str, int] = {"current": 0, "prev1": -1, "prev2": -2, "next": 1}
CONTROL_SUFFIX = "/control"
LOOP_TASK = "loop_index"

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# hashing helpers (deterministic across processes / machines; Python's hash() is salted)
# ---------------------------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _mix_seed(seed: int, salt: str = "") -> np.uint64:
    s = np.array([(int(seed) ^ (zlib.crc32(salt.encode()) << 32)) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return _splitmix64(_splitmix64(s))[0]


def _hash_ids(ids: np.ndarray, seed: int, salt: str) -> np.ndarray:
    ids = np.asarray(ids).astype(np.int64).view(np.uint64)
    return _splitmix64(ids ^ _mix_seed(seed, salt))


def _unit_hash(i: int, seed: int, salt: str) -> float:
    """Deterministic uniform number in [0, 1) for an integer id."""
    return float(_hash_ids(np.array([i]), seed, salt)[0] >> np.uint64(11)) / float(1 << 53)


def control_labels(types: Tensor, n_classes: int, seed: int = 0, salt: str = "",
                   probs: Tensor | None = None) -> Tensor:
    """Hewitt & Liang (2019) control labels: a fixed random map ``type -> label in [0, n_classes)``.

    ``types`` are raw token ids (word types), any shape. Each type's label is drawn once from ``probs`` (the
    real task's label distribution, as Hewitt & Liang sample from the empirical label distribution; uniform if
    ``None``) by inverse-CDF of a seeded splitmix64 hash of the type. The map needs no vocabulary size and
    gives the same label for the same (type, seed, salt, probs) in every batch, process and machine.
    Returns a LongTensor of the same shape on the same device.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t = torch.as_tensor(types)
    h = _hash_ids(t.detach().cpu().numpy().reshape(-1), seed, "control:" + salt)
    if probs is None:
        lab = (h % np.uint64(n_classes)).astype(np.int64)
    else:
        pr = torch.as_tensor(probs, dtype=_F64).cpu().numpy().reshape(-1)
        if pr.shape[0] != n_classes or (pr < 0).any() or pr.sum() <= 0:
            raise ValueError(f"probs must be {n_classes} non-negative numbers with a positive sum")
        cdf = np.cumsum(pr) / pr.sum()
        u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        lab = np.minimum(np.searchsorted(cdf, u, side="right"), n_classes - 1).astype(np.int64)
    return torch.from_numpy(lab).reshape(t.shape).to(t.device)


class Tally:
    """Test counts of one probe task: correct predictions, rows, rows of the majority training class."""

    __slots__ = ("correct", "total", "majority")

    def __init__(self) -> None:
        self.correct = self.total = self.majority = 0.0

    def add(self, pred: Tensor, y: Tensor, maj: int) -> None:
        y = y.to(pred.device)
        self.correct += float((pred == y).sum())
        self.total += float(y.numel())
        self.majority += float((y == maj).sum())


def probe_fields(real: Tally | None, control: Tally | None, n_train: float) -> dict[str, float]:
    """The result fields of one probe from the test tallies of the task and its control (NaN when absent):
    ``acc``, ``control_acc``, ``selectivity = acc - control_acc``, ``chance`` and ``control_chance``
    (majority-class accuracy on the test rows), ``selectivity_vs_chance``, ``n_train``, ``n_test`` (rows)."""
    nan = float("nan")
    acc = real.correct / real.total if real and real.total else nan
    chance = real.majority / real.total if real and real.total else nan
    cacc = control.correct / control.total if control and control.total else nan
    cchance = control.majority / control.total if control and control.total else nan
    return {"acc": acc, "control_acc": cacc, "selectivity": acc - cacc, "chance": chance,
            "control_chance": cchance, "selectivity_vs_chance": (acc - chance) - (cacc - cchance),
            "n_train": n_train, "n_test": real.total if real else 0.0}


# ---------------------------------------------------------------------------------------------------------------
# Token tasks
# ---------------------------------------------------------------------------------------------------------------
class TokenLabelMap:
    """Maps raw token ids to at most ``n_classes`` labels: top-(C-1) frequent ids, then one OTHER class.

    Build with ``from_counts`` (a token-frequency count [V], e.g. over the training split), ``from_tokens``
    (counts the given token tensors) or ``identity(V)`` (one class per id, no OTHER; only for small V).
    Calling the map on a LongTensor of token ids returns labels of the same shape; ids outside the
    table (>= V) map to OTHER.
    """

    def __init__(self, table: Tensor, n_classes: int, other: int | None, class_probs: Tensor | None = None):
        self.table = torch.as_tensor(table).long().cpu()
        self.n_classes = int(n_classes)
        self.other = other
        #: label distribution implied by the frequency count (None = unknown -> uniform control labels)
        self.class_probs = None if class_probs is None else torch.as_tensor(class_probs, dtype=_F64).cpu()
        self._dev_tables: dict[torch.device, Tensor] = {}

    @classmethod
    def from_counts(cls, counts: Tensor, max_classes: int = 256) -> "TokenLabelMap":
        if max_classes < 2:
            raise ValueError(f"max_classes must be >= 2 (at least one token class + OTHER), got {max_classes}")
        counts = torch.as_tensor(counts).to(_F64).cpu().reshape(-1)
        n_seen = int((counts > 0).sum())
        k = min(max_classes - 1, n_seen)
        order = torch.sort(counts, descending=True, stable=True).indices[:k]
        other = k
        table = torch.full((counts.shape[0],), other, dtype=torch.long)
        table[order] = torch.arange(k)
        cls_counts = torch.zeros(k + 1, dtype=_F64).index_add_(0, table, counts)
        probs = cls_counts / cls_counts.sum() if cls_counts.sum() > 0 else None
        return cls(table, k + 1, other, probs)

    @classmethod
    def from_tokens(cls, token_batches: Iterable[Tensor] | Tensor, vocab_size: int,
                    max_classes: int = 256) -> "TokenLabelMap":
        if isinstance(token_batches, Tensor):
            token_batches = [token_batches]
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for t in token_batches:
            counts += torch.bincount(torch.as_tensor(t).reshape(-1).long().cpu(), minlength=vocab_size)[:vocab_size]
        return cls.from_counts(counts, max_classes)

    @classmethod
    def identity(cls, vocab_size: int) -> "TokenLabelMap":
        return cls(torch.arange(vocab_size), vocab_size, None)

    def __call__(self, token_ids: Tensor) -> Tensor:
        t = torch.as_tensor(token_ids).long()
        tab = self._dev_tables.get(t.device)
        if tab is None:
            tab = self._dev_tables[t.device] = self.table.to(t.device)
        V = tab.shape[0]
        inside = (t >= 0) & (t < V)
        fill = self.other if self.other is not None else -1
        out = torch.where(inside, tab[t.clamp(0, V - 1)], torch.full_like(t, fill))
        if self.other is None and bool((out < 0).any()):
            raise ValueError("token id outside the identity label map")
        return out


def token_task_rows(n: int, offsets: Mapping[str, int] = TOKEN_TASKS) -> Tensor:
    """Common probed positions ``t`` of a length-``n`` sequence: those where ``t + offset`` exists for every
    task (``[2, n-2]`` for the default tasks). Empty if the sequence is too short."""
    lo = max([0, *(-o for o in offsets.values())])
    hi = n - max([0, *offsets.values()])
    return torch.arange(lo, max(lo, hi))


def token_task_labels(token_ids: Tensor, label_map: TokenLabelMap, offsets: Mapping[str, int] = TOKEN_TASKS,
                      *, control: bool = True, control_seed: int = 0, control_source: str = "target"
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """Build the token tasks of one sequence ``token_ids`` [n].

    Returns ``(rows, labels)``: ``rows`` = common positions (``token_task_rows``); ``labels[task]`` =
    ``label_map(token_ids[rows + offset])``, and with ``control=True`` also ``labels[task + "/control"]`` =
    ``control_labels(types, C, control_seed, salt=task, probs=label_map.class_probs)`` with
    ``types = token_ids[rows + offset]`` (``"target"``, default) or ``token_ids[rows]`` (``"current"``).
    """
    if control_source not in ("current", "target"):
        raise ValueError(f"control_source must be 'current' or 'target', got {control_source!r}")
    tok = torch.as_tensor(token_ids).long().reshape(-1)
    rows = token_task_rows(tok.shape[0], offsets).to(tok.device)
    out: dict[str, Tensor] = {}
    C = label_map.n_classes
    for name, off in offsets.items():
        tgt = tok[rows + off]
        out[name] = label_map(tgt)
        if control:
            types = tok[rows] if control_source == "current" else tgt
            out[name + CONTROL_SUFFIX] = control_labels(types, C, control_seed, salt=name, probs=label_map.class_probs)
    return rows, out


# ---------------------------------------------------------------------------------------------------------------
# Probe suite
# ---------------------------------------------------------------------------------------------------------------
class ProbeSuite:
    """All probes of one analysis, fed one sequence at a time in a single pass (optionally a second to test).

    >>> suite = ProbeSuite(TokenLabelMap.from_counts(counts, 256), loop_states={"h1": 0, "h2": 1, "h3": 2})
    >>> for i, (tok, states) in enumerate(data):      # states: {name: [seq, d]} for ONE sequence
    ...     suite.update(tok, states, seq_id=i)        # train seqs -> statistics, test seqs -> capped sample
    >>> suite.finalize()
    >>> # optional exact test pass (constant memory): for i, (tok, states): suite.evaluate(tok, states, i)
    >>> res = suite.results()   # {state: {task: {"acc", "control_acc", "selectivity", "chance", ...}}}

    One ``MultiTaskRidgeProbe`` per state name (created on first sight, width from the data) carries the
    token tasks and their controls; if ``loop_states`` maps state names to loop indices, one more probe
    (results key ``loop_key``) is trained on the rows of all those states pooled, task ``"loop_index"``
    (K = max index + 1 classes), control = random map of the current token type to ``[0, K)``.
    Result fields: ``acc``, ``control_acc``, ``selectivity = acc - control_acc``, ``chance`` and
    ``control_chance`` (majority-class baselines on the test rows), ``selectivity_vs_chance``, ``n_train``,
    ``n_test`` (rows); see ``results``.
    """

    def __init__(self, label_map: TokenLabelMap, *, tasks: Mapping[str, int] = TOKEN_TASKS,
                 loop_states: Mapping[str, int] | None = None, loop_key: str = "loops", l2: float = 1e-2,
                 control: bool = True, control_seed: int = 0, control_source: str = "target",
                 test_fraction: float = 0.2, split_seed: int = 0, test_cap_tokens: int = 8192,
                 dtype: torch.dtype = _F64, device: torch.device | str | None = None):
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if control_source not in ("current", "target"):
            raise ValueError(f"control_source must be 'current' or 'target', got {control_source!r}")
        self.label_map = label_map
        self.tasks = dict(tasks)
        self.loop_states = dict(loop_states or {})
        self.loop_key = loop_key
        self.n_loops = (max(self.loop_states.values()) + 1) if self.loop_states else 0
        self.l2, self.control, self.control_seed = l2, control, control_seed
        self.control_source = control_source
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.test_cap_tokens = int(test_cap_tokens)
        self.dtype, self.device = dtype, device
        self.probes: dict[str, MultiTaskRidgeProbe] = {}
        self._finalized = False
        # capped test sample: sorted list of (priority, seq_id), payload dict, token budget
        self._res_keys: list[tuple[float, int]] = []
        self._res_data: dict[int, tuple[Tensor, dict[str, Tensor]]] = {}
        self._res_tokens = 0
        self._res_threshold = float("inf")
        # exact second-pass counts: (state, task) -> Tally
        self._eval: dict[tuple[str, str], Tally] = {}
        self.n_train_seqs = 0
        self.n_test_seqs = 0

    # -- split ---------------------------------------------------------------------------------------------------
    def is_test(self, seq_id: int) -> bool:
        """Deterministic per-sequence split: ``hash(split_seed, seq_id) < test_fraction``."""
        return _unit_hash(int(seq_id), self.split_seed, "split") < self.test_fraction

    def _split(self, seq_id: int, split: str | None) -> str:
        if split is None:
            return "test" if self.is_test(seq_id) else "train"
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        return split

    # -- labels --------------------------------------------------------------------------------------------------
    def _labels(self, tok: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        rows, labels = token_task_labels(tok, self.label_map, self.tasks, control=self.control,
                                         control_seed=self.control_seed, control_source=self.control_source)
        loop_ctrl = None
        if self.loop_states and self.control:
            loop_ctrl = control_labels(tok[rows], self.n_loops, self.control_seed, salt=LOOP_TASK)
        return rows, labels, loop_ctrl

    def _task_classes(self) -> dict[str, int]:
        C = self.label_map.n_classes
        out = {}
        for k in self.tasks:
            out[k] = C
            if self.control:
                out[k + CONTROL_SUFFIX] = C
        return out

    def _loop_classes(self) -> dict[str, int]:
        out = {LOOP_TASK: self.n_loops}
        if self.control:
            out[LOOP_TASK + CONTROL_SUFFIX] = self.n_loops
        return out

    def _probe(self, key: str, d: int, classes: dict[str, int]) -> MultiTaskRidgeProbe:
        p = self.probes.get(key)
        if p is None:
            p = self.probes[key] = MultiTaskRidgeProbe(d, classes, self.l2, dtype=self.dtype, device=self.device)
        elif p.d != d:
            raise ValueError(f"state {key!r} had width {p.d}, now {d}")
        return p

    def _check(self, tok: Tensor, states: Mapping[str, Tensor]) -> Tensor:
        tok = torch.as_tensor(tok).long()
        if tok.ndim != 1:
            raise ValueError(f"token_ids must be [seq] for one sequence, got {tuple(tok.shape)}")
        if self.loop_key in states:
            raise ValueError(f"state name {self.loop_key!r} is reserved for the loop-index probe (loop_key)")
        for name, h in states.items():
            if h.ndim != 2 or h.shape[0] != tok.shape[0]:
                raise ValueError(f"state {name!r} must be [{tok.shape[0]}, d], got {tuple(h.shape)}")
        missing = [s for s in self.loop_states if s not in states]
        if missing:
            raise ValueError(f"loop states missing from this call: {missing}")
        return tok

    # -- pass 1 --------------------------------------------------------------------------------------------------
    def update(self, token_ids: Tensor, states: Mapping[str, Tensor], seq_id: int, split: str | None = None) -> str:
        """Feed one sequence: ``token_ids`` [seq], ``states`` {name: [seq, d]}. Returns the split used.

        Training sequences update the probes' statistics; test sequences enter the capped test sample.
        """
        if self._finalized:
            raise RuntimeError("update() after finalize(); use evaluate() for a test pass")
        tok = self._check(token_ids, states)
        which = self._split(seq_id, split)
        if token_task_rows(tok.shape[0], self.tasks).numel() == 0:
            return which
        if which == "train":
            self.n_train_seqs += 1
            rows, labels, loop_ctrl = self._labels(tok)
            classes = self._task_classes()
            for name, h in (states.items() if classes else ()):  # tasks={} -> loop-index probe only
                r = rows.to(h.device)
                self._probe(name, h.shape[1], classes).partial_fit(h[r], labels)
            for name, t in self.loop_states.items():
                h = states[name]
                r = rows.to(h.device)
                lab = {LOOP_TASK: torch.full((r.numel(),), t, dtype=torch.long)}
                if loop_ctrl is not None:
                    lab[LOOP_TASK + CONTROL_SUFFIX] = loop_ctrl
                self._probe(self.loop_key, h.shape[1], self._loop_classes()).partial_fit(h[r], lab)
        else:
            self.n_test_seqs += 1
            self._reservoir_add(int(seq_id), tok, states)
        return which

    def _reservoir_add(self, seq_id: int, tok: Tensor, states: Mapping[str, Tensor]) -> None:
        key = (_unit_hash(seq_id, self.split_seed, "reservoir"), seq_id)
        if key >= (self._res_threshold, -1) or seq_id in self._res_data:
            return
        rows = token_task_rows(tok.shape[0], self.tasks)
        # whole sequences (the rows are re-selected when scoring); copied so no caller buffer is kept alive
        data = {name: h.detach().to("cpu", copy=True) for name, h in states.items()}
        bisect.insort(self._res_keys, key)
        self._res_data[seq_id] = (tok.detach().cpu(), data)
        self._res_tokens += rows.numel()
        while self._res_tokens > self.test_cap_tokens and self._res_keys:
            k = self._res_keys.pop()
            self._res_threshold = min(self._res_threshold, k[0])
            t, _ = self._res_data.pop(k[1])
            self._res_tokens -= token_task_rows(t.shape[0], self.tasks).numel()

    def finalize(self) -> "ProbeSuite":
        """Solve every probe. Call once after pass 1."""
        if not self.probes:
            raise ValueError("no training sequences were seen")
        for p in self.probes.values():
            p.finalize()
        self._finalized = True
        return self

    # -- pass 2 (optional, exact) --------------------------------------------------------------------------------
    def _count(self, tok: Tensor, states: Mapping[str, Tensor]) -> None:
        rows, labels, loop_ctrl = self._labels(tok)
        for name, h in states.items():
            p = self.probes.get(name)
            if p is None:
                continue
            preds = p.predict(h[rows.to(h.device)])
            for task, pred in preds.items():
                self._tally(name, task, p, pred, labels[task])
        if self.loop_key in self.probes:
            p = self.probes[self.loop_key]
            for name, t in self.loop_states.items():
                h = states[name]
                preds = p.predict(h[rows.to(h.device)])
                lab = {LOOP_TASK: torch.full((rows.numel(),), t, dtype=torch.long)}
                if loop_ctrl is not None:
                    lab[LOOP_TASK + CONTROL_SUFFIX] = loop_ctrl
                for task, pred in preds.items():
                    self._tally(self.loop_key, task, p, pred, lab[task])

    def _tally(self, state: str, task: str, p: MultiTaskRidgeProbe, pred: Tensor, y: Tensor) -> None:
        self._eval.setdefault((state, task), Tally()).add(pred, y, int(p.class_counts(task).argmax()))

    def evaluate(self, token_ids: Tensor, states: Mapping[str, Tensor], seq_id: int,
                 split: str | None = None) -> bool:
        """Second pass: score one sequence if it is a test sequence (returns whether it was counted).

        Once any sequence is evaluated, ``results()`` uses these exact counts instead of the capped sample.
        """
        if not self._finalized:
            self.finalize()
        tok = self._check(token_ids, states)
        if self._split(seq_id, split) != "test" or token_task_rows(tok.shape[0], self.tasks).numel() == 0:
            return False
        self._count(tok, states)
        return True

    # -- results -------------------------------------------------------------------------------------------------
    def results(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{state: {task: {"acc", "control_acc", "selectivity", "chance", "control_chance",
        "selectivity_vs_chance", "n_train", "n_test"}}}`` (control fields NaN when ``control=False``).

        ``selectivity = acc - control_acc`` (Hewitt & Liang); ``selectivity_vs_chance = (acc - chance) -
        (control_acc - control_chance)`` also removes the gap between the two majority baselines (the control
        labels are drawn per *type*, so their majority fraction differs from the real task's by a random
        amount, large for small vocabularies). ``n_train`` / ``n_test`` count rows."""
        if not self._finalized:
            self.finalize()
        counts = self._eval
        if not counts:
            counts = {}
            saved, self._eval = self._eval, counts
            try:
                for seq_id in sorted(self._res_data):
                    tok, data = self._res_data[seq_id]
                    self._count(tok, data)
            finally:
                self._eval = saved
        out: dict[str, dict[str, dict[str, float]]] = {}
        for key, p in self.probes.items():
            base = [LOOP_TASK] if key == self.loop_key else list(self.tasks)
            out[key] = {task: probe_fields(counts.get((key, task)), counts.get((key, task + CONTROL_SUFFIX)),
                                           float(p.class_counts(task).sum())) for task in base}
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: probe statistics plus the capped test sample."""
        res = sum(t.numel() * t.element_size() for _, d in self._res_data.values() for t in d.values())
        return sum(p.nbytes for p in self.probes.values()) + res
