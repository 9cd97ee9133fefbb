"""One streaming pass over N token sequences: the paper's diagnostics, the probes, router maps and the lens.

    from meshprobe.analysis.run import analyze_model, sample_tokens
    tokens = sample_tokens("checkpoints/tiny-mesh", samples=500, seq_len=256, seed=0)
    metrics = analyze_model(model, tokens)          # a JSON-serializable dict (see METRICS_KEYS)

Memory does not grow with N: every batch ``[b, seq]`` is run through ``model.run_with_cache`` (only the
state / mesh hooks are cached, :mod:`meshprobe.analysis.collect`), folded into fixed-size accumulators
(``RunningStats`` for per-sample numbers, the probes' sufficient statistics) and dropped. ``Analyzer.nbytes``
reports the accumulator size; it is the same for every N once the first batch has been seen.

What is computed (every choice the paper leaves open is stated here and in ``notes`` of the output)
-----------------------------------------------------------------------------------------------
* **Relative update** ``r(f, h) = 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F)`` per sample (Frobenius norm over
  the sample's ``[seq, d]`` matrix) for each block of :func:`~meshprobe.analysis.collect.state_spec` (prelude,
  every core call with input h^(t) and output f_core(h^(t)) before any mixing, coda; single layers for
  vanilla models); mean and std over samples.
* **CKA** between every pair of states, the tokens of one sample as the examples, averaged over samples:
  RBF kernel with bandwidth ``sigma = sigma_frac * median pairwise Euclidean distance`` of each state matrix
  (``sigma_frac = 0.5``; Kornblith et al. 2019) and linear kernel; plain (biased) HSIC estimator.
* **Spectra**: top-``top`` (50) singular values ``sigma_i / sigma_0`` of each uncentered state matrix per
  sample, mean and std over samples (``null`` past ``min(seq, d)``). **Effective rank**: the entropy effective
  rank of Roy & Vetterli 2007, ``exp(-sum p_i log p_i)`` with ``p_i = sigma_i / sum_j sigma_j`` over all
  singular values of the uncentered ``[seq, d]`` state, mean and std over samples.
* **Lens**: mean next-token cross-entropy (nats; mean over positions of a sample, then over samples) when a
  state is decoded by the final LayerNorm + unembedding (``model.readout(h)``), and for h^(0) ... h^(K) also
  after running the coda first (``model.readout(h, through_coda=True)``; for h^(K) that is the model's own
  loss, reported as ``model_loss`` from the forward's logits). To keep the unembedding cost down only
  ``lens_positions = 64`` positions per sample are decoded, evenly spaced over ``0..seq-2`` (all positions
  for short sequences); the coda always runs on the whole sequence.
* **Probes** (this project's addition; :mod:`meshprobe.analysis.probes`): ``ProbeSuite`` ridge classifiers,
  the same probe (standardized features, ``l2 = 1e-2`` per sample, at most ``max_classes = 256`` classes: the
  255 most frequent token ids of the *training* sequences + OTHER) for every feature space and task. Feature
  spaces: every state, and for MeSH models every slot ``m0 ... m{B-1}`` of the buffer after the last write
  (``loop.{K-1}.mesh.hook_memory``). Tasks: ``current`` token, ``prev1`` / ``prev2`` (long-lived), ``next``
  (transient); rows are every position ``t in [2, seq-2]`` of a sequence. Split by sequence, by index: the
  last ``max(1, round(0.2 N))`` sequences are the test set, all others train; train sequences come first in
  the pass, the probes are solved when the first test sequence arrives and the test sequences are scored
  exactly (constant memory). Hewitt & Liang control tasks (each token type mapped to a random label, seed =
  ``seed``) give ``selectivity = acc - control_acc``; ``chance`` = majority-class accuracy on the test rows.
* **Loop-index probe** (recursive models): features h^(t+1) for t = 0..K-1 pooled, label t (``state``); and the
  same with the update ``f_core(h^(t)) - h^(t)`` as features (``update``). Same probe class and ``l2``;
  chance = majority class = 1/K on the balanced test rows; control = random map of the current token to
  ``[0, K)``.
* **MeSH routers** (steps ``entry``, ``loop 1`` ... ``loop K``; slots ``m0`` ...): per sample the mean write and
  read weight of each slot (mean over tokens), then mean / std over samples; per-token router entropy
  ``-sum_b w_b log w_b`` (nats; max ``log B``), mean / std over all tokens; ``write_read_overlap`` =
  ``sum_b w_write,b w_read,b`` per token (the coefficient of f_core(h^(t)) in h^(t+1), paper Prop. 2.1),
  mean / std over samples of its per-sample mean; ``slot_norm`` = L2 norm of each slot after the step's write,
  mean over tokens per sample, then mean / std over samples.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from meshprobe.analysis import metrics as M
from meshprobe.analysis import probes as P
from meshprobe.analysis.collect import StateSpec, check_tokens, iter_caches, state_spec
from meshprobe.errors import UserError

__all__ = ["Analyzer", "analyze_model", "sample_tokens", "METRICS_KEYS", "metric_key_paths", "to_jsonable",
           "FORMAT", "FORMAT_VERSION"]

FORMAT, FORMAT_VERSION = "meshprobe-analyze", 1

# ---------------------------------------------------------------------------------------------------------
# metrics.json: every key, documented. `metric_key_paths(obj)` lists the keys of an actual output in the same
# notation (models[] = each entry of the list; * = a feature / task name); a test checks both agree.
# ---------------------------------------------------------------------------------------------------------
_PROBE_FIELDS = {
    "acc": "test accuracy of the probe",
    "control_acc": "test accuracy of the same probe trained on the Hewitt & Liang control task",
    "selectivity": "acc - control_acc",
    "chance": "majority-class accuracy on the test rows (most frequent training label)",
    "control_chance": "majority-class accuracy of the control task on the test rows",
    "selectivity_vs_chance": "(acc - chance) - (control_acc - control_chance)",
    "n_train": "training rows",
    "n_test": "test rows",
}
_MS = "mean over samples", "std over samples (ddof=1)"

METRICS_KEYS: dict[str, str] = {
    "format": f'"{FORMAT}"',
    "version": "format version of this file (int)",
    "meshprobe_version": "meshprobe version that wrote the file",
    "models": "one entry per analysed checkpoint, in command-line order",
    "models[].name": "display name (--names, else the checkpoint folder name)",
    "models[].checkpoint": "checkpoint path (null when analyze_model was called on a model object)",
    "models[].model": "the model config (summary)",
    "models[].model.kind": '"recursive" or "vanilla"',
    "models[].model.layout": "layout string, e.g. 1+2R2+1",
    "models[].model.variant": "variant (base, residual, anchor, mesh, vanilla, ...)",
    "models[].model.d_model": "hidden width d",
    "models[].model.n_loops": "K (0 for vanilla)",
    "models[].model.mesh_slots": "B, MeSH buffer slots (null for other variants)",
    "models[].model.unrolled_depth": "layers in the unrolled forward",
    "models[].model.vocab_size": "model vocabulary",
    "models[].model.n_ctx": "model context length",
    "models[].model.parameters": "parameter counts",
    "models[].model.parameters.total": "all parameters",
    "models[].model.parameters.non_embedding": "all but embedding and unembedding",
    "models[].model.parameters.router": "MeSH router parameters",
    "models[].data": "the token sample and the run",
    "models[].data.source": "where the tokens came from (data spec + split, or a .npy file)",
    "models[].data.n_samples": "N, sequences analysed",
    "models[].data.seq_len": "tokens per sequence",
    "models[].data.seed": "sampling / control-task seed",
    "models[].data.batch_size": "sequences per forward",
    "models[].data.device": "device the analysis ran on",
    "models[].data.seconds": "wall time of the analysis (s)",
    "models[].states": "state names in forward order: h_emb, h^(0) ... h^(K), h_out (vanilla: h_emb, layer 1 ..., h_out)",
    "models[].blocks": "block names of the relative update: prelude, loop 1 ... loop K, coda (vanilla: layer 1 ...)",
    "models[].update": "relative update magnitude r(f, h) per block (paper Fig 1a / 3)",
    "models[].update.mean": "relative update r per block, " + _MS[0],
    "models[].update.std": "relative update r per block, " + _MS[1],
    "models[].cka": "pairwise CKA between states, tokens of one sample as examples (paper Fig 1b / 4)",
    "models[].cka.rbf": "RBF kernel",
    "models[].cka.rbf.mean": "[S][S] RBF-kernel CKA between states, " + _MS[0],
    "models[].cka.rbf.std": "[S][S] RBF-kernel CKA, " + _MS[1],
    "models[].cka.linear": "linear kernel",
    "models[].cka.linear.mean": "[S][S] linear CKA between states, " + _MS[0],
    "models[].cka.linear.std": "[S][S] linear CKA, " + _MS[1],
    "models[].cka.sigma_frac": "RBF bandwidth = sigma_frac * median pairwise distance (per state matrix)",
    "models[].cka.estimator": "HSIC estimator used (biased)",
    "models[].spectrum": "normalized singular values per state (paper Fig 1c / 5)",
    "models[].spectrum.top": "number of singular values kept",
    "models[].spectrum.center": "whether states were centered before the SVD (false)",
    "models[].spectrum.mean": "[S][top] sigma_i / sigma_0 per state, " + _MS[0] + " (null past min(seq, d))",
    "models[].spectrum.std": "[S][top] sigma_i / sigma_0 per state, " + _MS[1],
    "models[].effective_rank": "one effective rank per state",
    "models[].effective_rank.definition": "which effective rank (entropy effective rank, Roy & Vetterli 2007)",
    "models[].effective_rank.mean": "[S] effective rank per state, " + _MS[0],
    "models[].effective_rank.std": "[S] effective rank per state, " + _MS[1],
    "models[].lens": "next-token loss of intermediate states (a logit lens)",
    "models[].lens.states": "states decoded directly (final LN + unembedding): all states",
    "models[].lens.positions": "positions decoded per sample: lens_positions (default 64) evenly spaced over 0..seq-2, or all seq-1",
    "models[].lens.loss": "direct decoding of every state",
    "models[].lens.loss.mean": "[S] next-token cross-entropy (nats) of each state decoded directly, " + _MS[0],
    "models[].lens.loss.std": "[S] the same, " + _MS[1],
    "models[].lens.coda_states": "states also decoded through the coda: h^(0) ... h^(K) (empty for vanilla)",
    "models[].lens.coda_loss": "decoding through the coda (null for vanilla)",
    "models[].lens.coda_loss.mean": "cross-entropy of each coda state run through the coda, " + _MS[0],
    "models[].lens.coda_loss.std": "the same, " + _MS[1],
    "models[].lens.model_loss": "the model's own loss",
    "models[].lens.model_loss.mean": "the model's own next-token loss at the lens positions, " + _MS[0],
    "models[].lens.model_loss.std": "the model's own next-token loss at the lens positions, " + _MS[1],
    "models[].probes": "null when probes are off (--no-probes)",
    "models[].probes.config": "probe settings (identical for every feature space and task)",
    "models[].probes.config.classifier": "probe family (closed-form ridge classifier on standardized features)",
    "models[].probes.config.l2": "ridge strength per training row (same for every probe)",
    "models[].probes.config.max_classes": "classes of the token tasks (top token ids of the train split + OTHER)",
    "models[].probes.config.n_classes": "classes actually used",
    "models[].probes.config.split": "how sequences are split into train / test",
    "models[].probes.config.n_train_seqs": "training sequences",
    "models[].probes.config.n_test_seqs": "test sequences",
    "models[].probes.config.rows": "which positions of a sequence are probed",
    "models[].probes.config.control": "how control tasks are built",
    "models[].probes.features": "feature spaces probed: the states, then the MeSH slots m0 ... (if any)",
    "models[].probes.tasks": "token tasks: current, prev1, prev2 (long-lived), next (transient)",
    "models[].probes.token": "{feature: {task: result}} for the token tasks",
    "models[].probes.token.*": "one feature space (a state name or a slot m0, m1, ...)",
    "models[].probes.token.*.*": "one task (current, prev1, prev2, next)",
    **{f"models[].probes.token.*.*.{k}": v for k, v in _PROBE_FIELDS.items()},
    "models[].probes.loop_index": "loop-index probe (null for vanilla models)",
    "models[].probes.loop_index.state": "features h^(t+1), label t",
    "models[].probes.loop_index.update": "features f_core(h^(t)) - h^(t), label t",
    **{f"models[].probes.loop_index.state.{k}": "features h^(t+1), label t: " + v for k, v in _PROBE_FIELDS.items()},
    **{f"models[].probes.loop_index.update.{k}": "features f_core(h^(t)) - h^(t), label t: " + v
       for k, v in _PROBE_FIELDS.items()},
    "models[].router": "MeSH router analysis (null for non-MeSH models)",
    "models[].router.steps": "router steps: entry, loop 1 ... loop K",
    "models[].router.slots": "buffer slots m0 ... m{B-1}",
    "models[].router.write": "write-router weights",
    "models[].router.write.mean": "[steps][B] mean write weight per slot (mean over tokens), " + _MS[0],
    "models[].router.write.std": "[steps][B] the same, " + _MS[1],
    "models[].router.read": "read-router weights",
    "models[].router.read.mean": "[steps][B] mean read weight per slot (mean over tokens), " + _MS[0],
    "models[].router.read.std": "[steps][B] the same, " + _MS[1],
    "models[].router.write_entropy": "write-router entropy per token",
    "models[].router.write_entropy.mean": "[steps] per-token write-router entropy (nats), mean over all tokens",
    "models[].router.write_entropy.std": "[steps] per-token write-router entropy, std over all tokens",
    "models[].router.read_entropy": "read-router entropy per token",
    "models[].router.read_entropy.mean": "[steps] per-token read-router entropy (nats), mean over all tokens",
    "models[].router.read_entropy.std": "[steps] per-token read-router entropy, std over all tokens",
    "models[].router.max_entropy": "log B, the entropy of uniform routing",
    "models[].router.write_read_overlap": "coefficient of f_core(h^(t)) in the step's read",
    "models[].router.write_read_overlap.mean": "[steps] sum_b w_write,b w_read,b (per-sample token mean), " + _MS[0],
    "models[].router.write_read_overlap.std": "[steps] the same, " + _MS[1],
    "models[].router.slot_norm": "slot norms",
    "models[].router.slot_norm.mean": "[steps][B] L2 norm of each slot after the step's write (token mean), " + _MS[0],
    "models[].router.slot_norm.std": "[steps][B] the same, " + _MS[1],
    "models[].notes": "notes: analyses skipped and why, conventions",
}

#: dict paths whose keys are names (features, tasks), written `*` in METRICS_KEYS
VARIABLE_KEY_PATHS = {"models[].probes.token", "models[].probes.token.*"}


def metric_key_paths(obj: Any, prefix: str = "") -> set[str]:
    """Every key path of a metrics.json object in METRICS_KEYS notation (dicts are descended, a list of dicts
    is written ``name[]``, name-keyed dicts of VARIABLE_KEY_PATHS as ``*``; other lists are leaves)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "*" if prefix in VARIABLE_KEY_PATHS else k
            path = f"{prefix}.{key}" if prefix else key
            out.add(path)
            out |= metric_key_paths(v, path)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for x in obj:
            out |= metric_key_paths(x, prefix + "[]")
    return out


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Tensors / arrays -> nested lists of floats; NaN and inf -> None; tuples -> lists."""
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().double().numpy())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)) or obj is None or isinstance(obj, str):
        return bool(obj) if isinstance(obj, np.bool_) else obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    return obj


def _ms(rs: M.RunningStats | None) -> dict[str, Any]:
    if rs is None or rs.n == 0:
        return {"mean": None, "std": None}
    return {"mean": rs.mean, "std": rs.std}


def _entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dim of probability vectors, with 0 log 0 = 0."""
    w = w.double()
    return -(w * torch.log(torch.where(w > 0, w, torch.ones_like(w)))).sum(-1)


def _effective_rank_from_normalized(r: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank from normalized singular values sigma_i / sigma_0 (NaN entries ignored).

    Identical to ``metrics.effective_rank`` (p_i = sigma_i / sum sigma_j is scale-free); saves a second SVD."""
    r = torch.nan_to_num(r.double(), nan=0.0)
    tot = r.sum(-1, keepdim=True)
    p = r / torch.where(tot > 0, tot, torch.ones_like(tot))
    er = torch.exp(-(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1))
    return torch.where(tot.squeeze(-1) > 0, er, torch.full_like(er, float("nan")))


def _lens_positions(n: int, k: int | None) -> torch.Tensor:
    """The positions decoded by the lens: all of 0..n-2 (each predicts the next token), or ``k`` of them
    evenly spaced (first and last included) when ``k < n - 1``."""
    if k is None or k >= n - 1:
        return torch.arange(n - 1)
    return torch.linspace(0, n - 2, max(int(k), 1)).round().long().unique()


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per sample: logits [b, P, V], target [b, P] -> [b] (float64)."""
    b, p, V = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, V).float(), target.reshape(-1), reduction="none")
    return ce.view(b, p).double().mean(1)


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` (restored afterwards); ``None`` = leave as is.

    The per-sample statistics and probe updates are many small ops (256 x 128 matrices); with two OpenMP
    threads on a shared 2-core machine they were measured 10-100x slower than with one (the threads wait for
    each other whenever another process holds a core). :class:`Analyzer` therefore runs them with
    ``small_op_threads`` (1) on CPU; the forward and the lens use ``analyze_model(threads=...)``.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Tally:
    """Test counts of one probe task: correct, total, majority hits."""

    __slots__ = ("correct", "total", "majority")

    def __init__(self) -> None:
        self.correct = self.total = self.majority = 0.0

    def add(self, pred: torch.Tensor, y: torch.Tensor, maj: int) -> None:
        y = y.to(pred.device)
        self.correct += float((pred == y).sum())
        self.total += float(y.numel())
        self.majority += float((y == maj).sum())


def _probe_fields(acc, cacc, chance, cchance, n_train, n_test) -> dict[str, float]:
    return {"acc": acc, "control_acc": cacc, "selectivity": acc - cacc, "chance": chance,
            "control_chance": cchance, "selectivity_vs_chance": (acc - chance) - (cacc - cchance),
            "n_train": n_train, "n_test": n_test}


# ---------------------------------------------------------------------------------------------------------
# the streaming analysis
# ---------------------------------------------------------------------------------------------------------
class Analyzer:
    """Fixed-size accumulators for one model; feed it batches with :meth:`update`, then call :meth:`result`.

    ``n_samples`` fixes the train / test split of the probes (the last ``max(1, round(test_fraction * N))``
    sequence ids are the test set; train ids must all be fed before the first test id). ``label_map`` is the
    token-class map of the probes (built from the training sequences by :func:`analyze_model`).
    """

    def __init__(self, model, n_samples: int, *, label_map: P.TokenLabelMap | None = None, probes: bool = True,
                 seed: int = 0, sigma_frac: float = 0.5, top: int = 50, l2: float = 1e-2,
                 test_fraction: float = 0.2, max_classes: int = 256, lens_positions: int | None = 64,
                 small_op_threads: int | None = 1):
        if n_samples < 2:
            raise UserError(f"need at least 2 samples, got {n_samples}")
        self.model = model
        self.spec: StateSpec = state_spec(model)
        self.n_samples = int(n_samples)
        self.n_test = max(1, int(round(test_fraction * n_samples)))
        self.n_train = self.n_samples - self.n_test
        self.seed, self.sigma_frac, self.top, self.l2 = int(seed), float(sigma_frac), int(top), float(l2)
        self.test_fraction = float(test_fraction)
        self.max_classes = int(max_classes)
        self.small_op_threads = small_op_threads
        self.lens_positions = lens_positions
        self._n_lens_positions = 0
        self.stats: dict[str, M.RunningStats] = {}
        self.probes_on = bool(probes)
        self.suite: P.ProbeSuite | None = None
        self.label_map = label_map
        if self.probes_on:
            if label_map is None:
                raise ValueError("probes need a label_map (TokenLabelMap of the training sequences)")
            loop_states = {name: t for t, name in enumerate(self.spec.loop_states)}
            self.suite = P.ProbeSuite(label_map, loop_states=loop_states or None, l2=l2, control_seed=seed,
                                      split_seed=seed, test_fraction=test_fraction)
        self._update_probe: P.MultiTaskRidgeProbe | None = None
        self._update_tally: dict[str, _Tally] = {}
        self.n_seen = 0
        self._max_test_seen = -1

    # -- accumulators --------------------------------------------------------------------------------------
    def _rs(self, key: str) -> M.RunningStats:
        rs = self.stats.get(key)
        if rs is None:
            rs = self.stats[key] = M.RunningStats()
        return rs

    @property
    def nbytes(self) -> int:
        """Bytes held by all accumulators (independent of the number of samples fed)."""
        total = sum(rs.nbytes for rs in self.stats.values())
        if self.suite is not None:
            total += self.suite.nbytes
        if self._update_probe is not None:
            total += self._update_probe.nbytes
        return total

    def is_test(self, seq_id: int) -> bool:
        return seq_id >= self.n_train

    # -- one batch -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, seq_ids: Iterable[int], tok: torch.Tensor, cache: Mapping[str, torch.Tensor],
               logits: torch.Tensor) -> None:
        """Fold one batch in: ``tok`` [b, seq] (the batch's tokens), ``cache`` {hook: tensor} with every hook of
        ``spec.hook_names()``, ``logits`` [b, seq, vocab] of the forward, ``seq_ids`` the global ids."""
        spec, model = self.spec, self.model
        seq_ids = list(seq_ids)
        b = tok.shape[0]
        # 4. lens first (large matmuls, all threads), at the lens positions only
        pos = _lens_positions(tok.shape[1], self.lens_positions).to(tok.device)
        self._n_lens_positions = int(pos.numel())
        target = tok[:, pos + 1]
        self._rs("model_loss").update_batch(_ce(logits[:, pos], target))
        lens = [_ce(model.readout(cache[h][:, pos]), target) for _, h in spec.states]
        self._rs("lens").update_batch(torch.stack(lens, dim=1))
        if spec.lens_coda:
            hook = dict(spec.states)
            lc = [_ce(model.readout(model.run_coda(cache[hook[s]])[:, pos]), target) for s in spec.lens_coda]
            self._rs("lens_coda").update_batch(torch.stack(lc, dim=1))
        del lens
        small = torch_threads(self.small_op_threads) if tok.device.type == "cpu" else nullcontext()
        with small:
            self._diagnostics(cache)
            if spec.is_mesh:
                self._router(cache)
            if self.suite is not None:
                self._probe_batch(seq_ids, tok, cache)
        self.n_seen += b

    def _diagnostics(self, cache: Mapping[str, torch.Tensor]) -> None:
        spec = self.spec
        # 1. relative update per block -> [b, n_blocks]
        r = torch.stack([M.relative_update(cache[o], cache[i]) for _, i, o in spec.blocks], dim=1)
        self._rs("update").update_batch(r)
        # 2. CKA and 3. spectra: states stacked [b, S, n, d]
        X = torch.stack([cache[h] for _, h in spec.states], dim=1)
        self._rs("cka_rbf").update_batch(M.cka_matrix(X, "rbf", sigma_frac=self.sigma_frac))
        self._rs("cka_linear").update_batch(M.cka_matrix(X, "linear"))
        spec_all = M.singular_spectrum(X, top=None)  # [b, S, min(n, d)]
        self._rs("erank").update_batch(_effective_rank_from_normalized(spec_all))
        k = spec_all.shape[-1]
        top = spec_all[..., : self.top]
        if k < self.top:
            top = torch.cat([top, top.new_full((*top.shape[:-1], self.top - k), float("nan"))], dim=-1)
        self._rs("spectrum").update_batch(top)

    def _router(self, cache: Mapping[str, torch.Tensor]) -> None:
        steps = self.spec.mesh_steps
        ww = torch.stack([cache[f"{p}.hook_write_weights"] for _, p in steps], dim=1).double()  # [b, T, n, B]
        wr = torch.stack([cache[f"{p}.hook_read_weights"] for _, p in steps], dim=1).double()
        self._rs("router_write").update_batch(ww.mean(2))
        self._rs("router_read").update_batch(wr.mean(2))
        T = ww.shape[1]
        self._rs("router_write_entropy").update_batch(_entropy(ww).permute(0, 2, 1).reshape(-1, T))
        self._rs("router_read_entropy").update_batch(_entropy(wr).permute(0, 2, 1).reshape(-1, T))
        self._rs("router_overlap").update_batch((ww * wr).sum(-1).mean(-1))
        norms = torch.stack([cache[f"{p}.hook_memory"].norm(dim=-1).double().mean(-1) for _, p in steps], dim=1)
        self._rs("router_slot_norm").update_batch(norms)  # [b, T, B]

    def _probe_batch(self, seq_ids: list[int], tok: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> None:
        spec, suite = self.spec, self.suite
        mem = cache[spec.final_memory_hook] if spec.is_mesh else None
        for i, sid in enumerate(seq_ids):
            feats = {name: cache[h][i] for name, h in spec.states}
            if mem is not None:
                feats.update({f"m{s}": mem[i, s] for s in range(mem.shape[1])})
            updates = [cache[o][i] - cache[a][i] for _, a, o in spec.core_steps]
            if self.is_test(sid):
                self._max_test_seen = max(self._max_test_seen, sid)
                suite.evaluate(tok[i], feats, seq_id=sid, split="test")
                self._update_eval(tok[i], updates)
            else:
                if self._max_test_seen >= 0:
                    raise ValueError("probe training sequences must all come before the first test sequence")
                suite.update(tok[i], feats, seq_id=sid, split="train")
                self._update_fit(tok[i], updates)

    # loop-index probe on the updates f_core(h^(t)) - h^(t): same probe class and l2 as the suite
    def _update_rows(self, tok: torch.Tensor, updates: list[torch.Tensor]):
        K = len(updates)
        rows = P.token_task_rows(tok.shape[0], self.suite.tasks).to(tok.device)
        X = torch.cat([u[rows] for u in updates])
        y = torch.arange(K, device=tok.device).repeat_interleave(rows.numel())
        ctrl = P.control_labels(tok[rows], K, self.seed, salt=P.LOOP_TASK).repeat(K)
        return X, {P.LOOP_TASK: y, P.LOOP_TASK + P.CONTROL_SUFFIX: ctrl}

    def _update_fit(self, tok: torch.Tensor, updates: list[torch.Tensor]) -> None:
        if not updates:
            return
        X, labels = self._update_rows(tok, updates)
        if X.shape[0] == 0:
            return
        if self._update_probe is None:
            K = len(updates)
            self._update_probe = P.MultiTaskRidgeProbe(X.shape[1], {k: K for k in labels}, self.l2)
        self._update_probe.partial_fit(X, labels)

    def _update_eval(self, tok: torch.Tensor, updates: list[torch.Tensor]) -> None:
        p = self._update_probe
        if not updates or p is None or p.n == 0:
            return
        X, labels = self._update_rows(tok, updates)
        if X.shape[0] == 0:
            return
        for task, pred in p.predict(X).items():
            maj = int(p.class_counts(task).argmax())
            self._update_tally.setdefault(task, _Tally()).add(pred, labels[task], maj)

    # -- result ------------------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        """The per-model metrics dict (tensors converted to lists, NaN to None): see METRICS_KEYS."""
        spec, cfg, st = self.spec, self.model.cfg, self.stats
        if self.n_seen == 0:
            raise ValueError("no batches were fed")
        notes: list[str] = []
        out: dict[str, Any] = {
            "states": spec.state_names,
            "blocks": spec.block_names,
            "update": _ms(st.get("update")),
            "cka": {"rbf": _ms(st.get("cka_rbf")), "linear": _ms(st.get("cka_linear")),
                    "sigma_frac": self.sigma_frac, "estimator": "biased HSIC (Kornblith et al. 2019)"},
            "spectrum": {"top": self.top, "center": False, **_ms(st.get("spectrum"))},
            "effective_rank": {"definition": "entropy effective rank exp(-sum p_i log p_i), p_i = sigma_i / "
                                             "sum_j sigma_j, uncentered state (Roy & Vetterli 2007)",
                               **_ms(st.get("erank"))},
            "lens": {"states": spec.state_names, "positions": self._n_lens_positions, "loss": _ms(st.get("lens")), "coda_states": list(spec.lens_coda),
                     "coda_loss": _ms(st.get("lens_coda")), "model_loss": _ms(st.get("model_loss"))},
        }
        if spec.kind == "vanilla":
            notes.append("vanilla model: states are h_emb and the residual stream after each layer "
                         "(blocks.{u}.hook_resid_post); relative update per layer; no coda lens")
        # probes
        if self.suite is None:
            out["probes"] = None
            notes.append("probes skipped (--no-probes)")
        else:
            out["probes"] = self._probe_result(notes)
        # router
        if spec.is_mesh:
            B = spec.n_slots
            out["router"] = {
                "steps": [s for s, _ in spec.mesh_steps], "slots": [f"m{b}" for b in range(B)],
                "write": _ms(st.get("router_write")), "read": _ms(st.get("router_read")),
                "write_entropy": _ms(st.get("router_write_entropy")),
                "read_entropy": _ms(st.get("router_read_entropy")), "max_entropy": math.log(B),
                "write_read_overlap": _ms(st.get("router_overlap")), "slot_norm": _ms(st.get("router_slot_norm")),
            }
        else:
            out["router"] = None
            notes.append(f"router analysis and memory-slot probes skipped: variant {cfg.variant!r} has no MeSH "
                         "hooks")
        if self.n_seen != self.n_samples:
            notes.append(f"only {self.n_seen} of {self.n_samples} samples were fed")
        out["notes"] = notes
        return to_jsonable(out)

    def _probe_result(self, notes: list[str]) -> dict[str, Any]:
        suite, spec = self.suite, self.spec
        if self._max_test_seen < 0:
            raise ValueError("no test sequence was fed to the probes")
        res = suite.results()
        lm = self.label_map
        features = spec.state_names + ([f"m{b}" for b in range(spec.n_slots)] if spec.is_mesh else [])
        token = {f: res[f] for f in features if f in res}
        loop_index = None
        if spec.loop_states:
            state = res.get(suite.loop_key, {}).get(P.LOOP_TASK)
            upd = None
            p = self._update_probe
            if p is not None and self._update_tally:
                t, c = self._update_tally.get(P.LOOP_TASK), self._update_tally.get(P.LOOP_TASK + P.CONTROL_SUFFIX)
                nan = float("nan")
                acc = t.correct / t.total if t and t.total else nan
                chance = t.majority / t.total if t and t.total else nan
                cacc = c.correct / c.total if c and c.total else nan
                cchance = c.majority / c.total if c and c.total else nan
                upd = _probe_fields(acc, cacc, chance, cchance, float(p.class_counts(P.LOOP_TASK).sum()),
                                    t.total if t else 0.0)
            loop_index = {"state": state, "update": upd}
            if len(spec.loop_states) == 1:
                notes.append("K = 1: the loop-index probe has a single class (trivially 100%)")
        else:
            notes.append("loop-index probe skipped: the model has no loop")
        return {
            "config": {
                "classifier": "closed-form ridge classifier on one-hot targets, standardized features, argmax "
                              "(sklearn RidgeClassifier model), streamed sufficient statistics",
                "l2": self.l2, "max_classes": self.max_classes, "n_classes": int(lm.n_classes),
                "split": f"by sequence index: the last max(1, round({self.test_fraction} N)) sequences are test",
                "n_train_seqs": self.n_train, "n_test_seqs": self.n_test,
                "rows": "every position t in [2, seq-2] of a sequence",
                "control": f"Hewitt & Liang: a fixed random label per current token type, drawn from the task's "
                           f"label distribution (seed {self.seed}); loop index: random map to [0, K)",
            },
            "features": features,
            "tasks": list(suite.tasks),
            "token": token,
            "loop_index": loop_index,
        }


# ---------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------
def _model_info(model) -> dict[str, Any]:
    cfg = model.cfg
    return {"kind": "vanilla" if cfg.is_vanilla else "recursive", "layout": cfg.layout, "variant": cfg.variant,
            "d_model": cfg.d_model, "n_loops": cfg.n_loops, "mesh_slots": cfg.mesh_slots,
            "unrolled_depth": cfg.unrolled_depth, "vocab_size": cfg.vocab_size, "n_ctx": cfg.n_ctx,
            "parameters": model.parameter_counts()}


def analyze_model(model, tokens: torch.Tensor, *, batch_size: int = 8, device: str | torch.device | None = None,
                  probes: bool = True, progress: bool = True, seed: int = 0, name: str | None = None,
                  checkpoint: str | None = None, source: str | None = None, sigma_frac: float = 0.5,
                  top: int = 50, max_classes: int = 256, l2: float = 1e-2, test_fraction: float = 0.2,
                  lens_positions: int | None = 64, threads: int | None = 1,
                  analyzer_out: list | None = None) -> dict[str, Any]:
    """Run every analysis of this module on ``tokens`` [N, seq] (int) in one streaming pass; returns the
    per-model metrics dict (JSON-serializable, the ``models[]`` entry of metrics.json, see METRICS_KEYS).

    ``device``: where to run (default: the model's device; the model is moved there). ``probes=False`` skips
    the probes (the slowest part). ``progress``: a tqdm bar over samples on stderr. ``seed`` seeds the control
    tasks. ``threads``: torch CPU threads during the analysis (restored afterwards; ``None`` = leave as is).
    The default 1 is deliberate: on a shared 2-core machine one thread was measured 3-5x faster than two for
    the whole analysis (OpenMP threads wait for each other whenever another process holds a core); raise it on
    an idle many-core machine. ``analyzer_out``: if a list is given, the :class:`Analyzer` is appended to it.
    """
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model = model.to(device).eval()
    N, seq = tokens.shape
    t0 = time.time()
    label_map = None
    n_test = max(1, int(round(test_fraction * N)))
    if probes:
        label_map = P.TokenLabelMap.from_tokens(tokens[: N - n_test], cfg.vocab_size, max_classes=max_classes)
    an = Analyzer(model, N, label_map=label_map, probes=probes, seed=seed, sigma_frac=sigma_frac, top=top, l2=l2,
                  test_fraction=test_fraction, max_classes=max_classes, lens_positions=lens_positions)
    if analyzer_out is not None:
        analyzer_out.append(an)
    bar = None
    threads_ctx = torch_threads(threads) if device.type == "cpu" else nullcontext()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=N, unit="sample", desc=name or "analyze", leave=False, dynamic_ncols=True)
    try:
        with threads_ctx:
            for start, tok, cache, logits in iter_caches(model, tokens, an.spec.hook_names(), batch_size, device):
                an.update(range(start, start + tok.shape[0]), tok, cache, logits)
                if bar is not None:
                    bar.update(tok.shape[0])
            out = an.result()
    finally:
        if bar is not None:
            bar.close()
    result = {
        "name": name or (Path(checkpoint).name if checkpoint else f"{cfg.layout}-{cfg.variant}"),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "model": to_jsonable(_model_info(model)),
        "data": {"source": source or "tokens given to analyze_model", "n_samples": N, "seq_len": seq, "seed": seed,
                 "batch_size": batch_size, "device": str(device), "seconds": round(time.time() - t0, 3)},
    }
    result.update(out)
    return result


def _default_data_spec(config: Mapping[str, Any]):
    meta = config.get("metadata") or {}
    train = meta.get("train") or {}
    if train.get("data"):
        return train["data"]
    data = meta.get("data") or {}
    if isinstance(data, dict) and data.get("spec"):
        return data["spec"]
    if isinstance(data, (str, list)) and data:
        return data
    return "shakespeare"


def sample_tokens(ckpt, samples: int = 500, seq_len: int = 256, seed: int = 0, data=None, *, tokenizer=None,
                  split: str = "val") -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens drawn deterministically (``seed``) from the validation split
    of the checkpoint's training corpus (``metadata.train.data``; ``data`` overrides it), tokenized with the
    checkpoint's tokenizer. ``ckpt``: a checkpoint path, or a loaded model (then pass ``tokenizer``; the corpus
    comes from ``model.checkpoint_config`` or ``data``). Returns a LongTensor [samples, seq_len]."""
    from meshprobe import data as D
    from meshprobe.checkpoint import load_tokenizer, read_checkpoint_config

    if samples < 2:
        raise UserError(f"need at least 2 samples, got {samples}")
    if isinstance(ckpt, (str, os.PathLike)):
        config = read_checkpoint_config(ckpt)
        tok = tokenizer or load_tokenizer(ckpt)
        where = str(ckpt)
    else:
        config = getattr(ckpt, "checkpoint_config", None) or {"model": ckpt.cfg.to_dict()}
        tok = tokenizer
        where = "the model"
    if tok is None:
        raise UserError(f"{where} has no tokenizer.json: pass pre-tokenized sequences with --tokens FILE.npy")
    n_ctx = config["model"]["n_ctx"]
    if seq_len > n_ctx:
        raise UserError(f"seq_len {seq_len} is above the model context n_ctx={n_ctx}")
    if tok.get_vocab_size() > config["model"]["vocab_size"]:
        raise UserError(f"{where}: tokenizer ({tok.get_vocab_size()} ids) larger than the model vocabulary")
    spec = data if data else _default_data_spec(config)
    corpus = D.open_corpus(spec, quiet=True)
    ids = D.tokenize_corpus(corpus, tok)[split]
    if len(ids) < seq_len:
        raise UserError(f"data {corpus.name}: only {len(ids)} {split} tokens, need at least seq_len = {seq_len}")
    return torch.from_numpy(D.sample_sequences(ids, samples, seq_len, seed))
