"""The probes of ``meshprobe analyze``: token-information, embedding-retrieval, increment and loop-step probes
over every state (and MeSH slot) of one model, streamed batch by batch (memory independent of N).

:class:`ProbeSuite` wires the library probes (:mod:`meshprobe.analysis.probes.tokens`,
:mod:`meshprobe.analysis.probes.loops`) to the cached states of a forward pass:

* **Feature spaces**: every state of :func:`~meshprobe.analysis.pipeline.collect.state_spec` (h_emb, h^(0) ... h^(K),
  h_out; vanilla: h_emb, layer 1 ..., h_out) and, for MeSH models, every buffer slot m0 ... m{B-1} after the last
  write (``loop.{K-1}.mesh.hook_memory``), or the subset given by ``features``.
* **Token probes** at the target offsets (default ``(0, -1, -2, -4, -8, +1)``; x_{i+k}): one
  :class:`~meshprobe.analysis.probes.tokens.TokenProbePlan` for all feature spaces (same classes, rows, split).
  Offsets that the sample cannot support (|k| >= seq - 1, or fewer than 2 classes with enough test rows) are
  dropped with a note.
* **L2 selection** (``l2_mode``): ``"per_offset"`` (default) chooses the logistic probe's L2 by cross-validation
  once per offset, on the reference feature space (the state just before h_out: h^(K)), and reuses it for
  every other feature space at that offset (how much regularisation a target needs depends mostly on how
  much of it is decodable, i.e. on the offset); ``"cv"`` cross-validates every (feature space, offset).
  Measured on ``checkpoints/loop3-base`` (500 x 256): the shared L2 moves the accuracies by at most 0.8 of
  their CI width (R² is unaffected: its ridge L2 is always cross-validated), but the cross-entropies of
  low-information states (h_emb, h^(0) at k = -2, -4) by up to 2 CI widths, and sharing the L2 in the
  increment moved ΔCE by up to 2.7 CI widths; so both probes of the increment are always cross-validated
  (the base probe's fit on h_emb is cached and shared by every feature space).
* **Increment** over h_emb for every other feature space and every offset except 0.
* **Loop-step probe** (recursive models with K >= 2): :class:`~meshprobe.analysis.probes.loops.
  LoopStepAccumulator` on h^(t+1) and f_core(h^(t)) - h^(t).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from meshprobe.analysis.pipeline.collect import StateSpec
from meshprobe.analysis.probes.loops import LOOP_FEATURES, LoopStepAccumulator
from meshprobe.analysis.stats import shared_ngram_fraction
from meshprobe.analysis.probes.tokens import DEFAULT_OFFSETS, TokenProbePlan

__all__ = ["ProbeSuite", "offset_key", "BASELINES", "random_init_baseline", "baseline_wanted",
           "BASELINE_AUTO_MAX_PARAMS"]

#: what each baseline of the token probes is (written to metrics.json)
BASELINES = {
    "chance": "1 / classes of the balanced logistic probe (equal train and test rows per class, the C most "
              "frequent target types of the training rows, no catch-all class)",
    "prior_ce": "cross-entropy of the training class frequencies (uniform: log classes); ce_gain = prior_ce - ce",
    "retrieval_majority": "retrieval top-1 of always answering the most frequent training token",
    "h_emb": "the same probes on h_emb (the token embedding, which holds x_i exactly and nothing else): what the "
             "current token alone tells about x_{i+k}",
    "increment": "balanced logistic probe on [h_emb, state] vs on h_emb alone, same rows: delta_ce = CE(h_emb) - "
                 "CE(joint) (nats) and delta_accuracy, paired bootstrap CIs: what the state tells beyond x_i",
    "random_init": "the same probes on a freshly initialised model of the same config (seeded by the analysis "
                   "seed), same tokens, same rows: what the architecture gives without training",
    "loop_step": "chance 1/K, a label-permutation null (refits on shuffled training labels) and a norm-only "
                 "probe (one feature: the vector's L2 norm)",
    "ci": "95% percentile bootstrap over test sequences (1000 resamples)",
}


def offset_key(k: int) -> str:
    """The metrics.json key of target offset k: "0", "-1", "+1", ..."""
    return "0" if k == 0 else f"{k:+d}"


def _plan(tokens, offsets, notes: list[str], progress: bool = False, **kw) -> TokenProbePlan | None:
    S = tokens.shape[1]
    ok = []
    for k in offsets:
        if abs(k) >= S - 1:
            notes.append(f"token probe offset {k} dropped: sequences of {S} tokens are too short")
            continue
        try:  # the rows do not depend on the code: check without it (a wide embedding's PCA runs once)
            TokenProbePlan(tokens, [k], **{**kw, "embedding": None})
            ok.append(k)
        except ValueError as exc:
            notes.append(f"token probe offset {k} dropped: {exc}")
    if not ok:
        return None
    return TokenProbePlan(tokens, ok, progress=progress, **kw)


class ProbeSuite:
    """Every probe of one model; ``update(seq_ids, cache)`` per batch, then :meth:`result`.

    ``tokens`` [N, S]: the whole sample (the plan is a function of the tokens and ``seed``); ``embedding``
    [V, e]: the retrieval code (the model's input embedding in ``meshprobe analyze``); ``features``: the feature
    spaces to probe (default: all states and slots); ``increments`` / ``loop``: whether to run them; other keywords go to
    :class:`~meshprobe.analysis.probes.tokens.TokenProbePlan` (e.g. ``retrieval_test_rows``)."""

    def __init__(self, spec: StateSpec, tokens: torch.Tensor, *, offsets: Sequence[int] = DEFAULT_OFFSETS,
                 max_classes: int = 64, seed: int = 0, embedding: torch.Tensor | None = None,
                 max_train_per_class: int = 64, max_test_per_class: int = 128, l2_mode: str = "per_offset",
                 n_perm: int = 20, features: Sequence[str] | None = None, increments: bool = True,
                 loop: bool = True, test_fraction: float = 0.3, progress: bool = False, **plan_kw):
        if l2_mode not in ("per_offset", "cv"):
            raise ValueError(f"l2_mode must be 'per_offset' or 'cv', got {l2_mode!r}")
        self.spec, self.seed, self.l2_mode, self.n_perm = spec, int(seed), l2_mode, int(n_perm)
        self.progress, self.timing = bool(progress), {}  # timing: phase -> seconds of result()
        self._bar = None
        self.notes: list[str] = []
        self.plan = _plan(tokens, [int(k) for k in offsets], self.notes, max_classes=max_classes, seed=seed,
                          embedding=embedding, max_train_per_class=max_train_per_class,
                          max_test_per_class=max_test_per_class, test_fraction=test_fraction, progress=progress,
                          **plan_kw)
        every = spec.state_names + [f"m{b}" for b in range(spec.n_slots)]
        self.features = list(every if features is None else [f for f in features if f in every])
        self.acc = {f: self.plan.accumulator() for f in self.features} if self.plan is not None else {}
        self.increments = bool(increments) and "h_emb" in self.acc
        self.loop: LoopStepAccumulator | None = None
        N, S = tokens.shape
        if loop and len(spec.loop_states) >= 2:
            try:
                self.loop = LoopStepAccumulator(N, S, len(spec.loop_states), seed=seed, test_fraction=test_fraction)
            except ValueError as exc:
                self.notes.append(f"loop-step probe skipped: {exc}")
        elif loop and spec.kind != "vanilla":
            self.notes.append("loop-step probe skipped: it needs K >= 2 loop steps")
        self.max_classes, self.max_train_per_class = int(max_classes), int(max_train_per_class)
        self.max_test_per_class = int(max_test_per_class)

    @property
    def active(self) -> bool:
        return bool(self.acc) or self.loop is not None

    def nbytes(self) -> int:
        return sum(a.nbytes() for a in self.acc.values()) + (self.loop.nbytes() if self.loop else 0)

    @torch.no_grad()
    def update(self, seq_ids, cache: Mapping[str, torch.Tensor]) -> None:
        spec = self.spec
        hooks = dict(spec.states)
        seq = torch.as_tensor(list(seq_ids), dtype=torch.long)
        mem = cache[spec.final_memory_hook] if spec.is_mesh and any(f not in hooks for f in self.acc) else None
        for f, acc in self.acc.items():
            acc.update(seq, cache[hooks[f]] if f in hooks else mem[:, int(f[1:])])
        if self.loop is not None:
            outs = [cache[hooks[s]] for s in spec.loop_states]
            upds = [cache[o] - cache[a] for _, a, o in spec.core_steps]
            self.loop.update(seq, outs, upds)

    # -- results -------------------------------------------------------------------------------------------
    @property
    def reference(self) -> str:
        """The feature space whose cross-validated L2 is shared at each offset (``per_offset``): the state just
        before h_out (h^(K) for recursive models), else the first feature space probed."""
        ref = self.spec.state_names[-2]
        return ref if ref in self.acc else next(iter(self.acc), "")

    def _l2(self, k: int) -> float | None:
        """The L2 at offset ``k`` under ``per_offset`` (chosen by CV on the reference feature space)."""
        if self.l2_mode == "cv":
            return None
        return self.acc[self.reference].logistic(k)[0]["l2"]

    def token_results(self) -> dict[str, dict[str, dict]]:
        out = {}
        for f, acc in self.acc.items():
            out[f] = {}
            for k in self.plan.offsets:
                out[f][offset_key(k)] = _slim(acc.result(k, None if f == self.reference else self._l2(k)))
                self._tick(f"{f} k={k:+d}")
        return out

    def _tick(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    def _fits(self) -> int:
        """Probe fits of :meth:`result` (the progress bar's total)."""
        K = len(self.plan.offsets) if self.plan is not None else 0
        inc = (len(self.acc) - 1) * sum(k != 0 for k in self.plan.offsets) if self.increments else 0
        return len(self.acc) * K + inc + (len(LOOP_FEATURES) if self.loop is not None else 0)

    def increment_results(self) -> dict[str, dict[str, dict]]:
        if not self.increments:
            return {}
        base = self.acc["h_emb"]
        out: dict[str, dict] = {}
        for f, acc in self.acc.items():
            if f != "h_emb":  # both probes cross-validated (the base's fit is cached across feature spaces)
                out[f] = {}
                for k in self.plan.offsets:
                    if k != 0:
                        out[f][offset_key(k)] = _slim(acc.increment(base, k))
                        self._tick(f"{f} increment k={k:+d}")
        return {f: out[f] for f in self.acc if f in out}

    def config(self) -> dict[str, Any]:
        p = self.plan
        cfg: dict[str, Any] = {
            "classifier": "multinomial logistic regression (softmax cross-entropy + L2, z-scored features, "
                          "L-BFGS) on the C most frequent target types, equal train / test rows per class",
            "retrieval": "ridge regression onto the target token's code, nearest code among all types",
            "retrieval_code": None if p is None else p.code_name,
            "offsets": [] if p is None else list(p.offsets),
            "max_classes": self.max_classes,
            "max_train_per_class": self.max_train_per_class, "max_test_per_class": self.max_test_per_class,
            "l2_selection": (f"per offset: L2 chosen by 3-fold CV over training sequences on {self.reference} "
                             "(grid 1e-1 ... 1e-4), reused for every feature space at that offset (ce / ce_gain of "
                             "low-information states may then read low; accuracy within its CI); increment: both "
                             "probes by CV"
                             if self.l2_mode == "per_offset" else
                             "L2 chosen by 3-fold CV over training sequences for every probe"),
            "split": "by sequence: a seeded hash of the sequence id puts 30% of the sequences in the test set",
            "n_train_seqs": 0 if p is None else int(p.is_train.sum()),
            "n_test_seqs": 0 if p is None else int(p.is_test.sum()),
            "shared_16gram_fraction": None,
            "baselines": BASELINES,
        }
        if p is not None:
            tok = p.tokens.numpy()
            cfg["shared_16gram_fraction"] = shared_ngram_fraction(tok[p.is_train.numpy()], tok[p.is_test.numpy()], 16)
        return cfg

    def result(self) -> dict[str, Any]:
        """The ``probes`` entry of metrics.json (without the random-init baseline); ``timing`` gets the seconds
        of the token probes, the increment and the loop-step probe; a progress bar counts the fits."""
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._fits(), desc="probe fits", unit="fit", leave=False, dynamic_ncols=True)
        try:
            out: dict[str, Any] = {"config": self.config(), "features": list(self.acc)}
            for key, phase, run in (("token", "token_probes", self.token_results),
                                    ("increment", "increment", lambda: self.increment_results() or None),
                                    ("loop_step", "loop_step_probe", self._loop_result)):
                t = time.perf_counter()
                out[key] = run()
                self.timing[phase] = self.timing.get(phase, 0.0) + time.perf_counter() - t
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        return out

    def _loop_result(self) -> dict | None:
        if self.loop is None:
            return None
        return self.loop.result(n_perm=self.n_perm, tick=lambda kind: self._tick(f"loop step: {kind}"))


_DROP = ("class_ids", "baseline", "definition", "retrieval_vocab", "retrieval_code", "n_test_sequences")


def _slim(res: dict) -> dict:
    """A probe result without the per-result constants (they are in ``probes.config``)."""
    return {k: v for k, v in res.items() if k not in _DROP}



@torch.no_grad()
def random_init_baseline(model, tokens: torch.Tensor, *, features: Sequence[str] | None = None, seed: int = 0,
                         batch_size: int = 8, device=None, **suite_kw) -> dict[str, Any]:
    """The token probes on a freshly initialised model of ``model``'s config (weights drawn under
    ``torch.manual_seed(seed)`` without touching the caller's RNG state), on the same tokens and rows.
    ``features``: the feature spaces (default: the state just before h_out, i.e. h^(K) for recursive models).
    The retrieval code is the random model's own input embedding. Returns ``{"model", "features", "token"}``."""
    from meshprobe.analysis.pipeline.collect import iter_caches, state_spec
    from meshprobe.model import build_model

    device = device or next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        fresh = getattr(model, "fresh_init", None)  # a wrapped transformers model builds its own
        rnd = (fresh() if fresh is not None else build_model(model.cfg)).to(device).eval()
    spec = state_spec(rnd)
    feats = list(features) if features is not None else [spec.state_names[-2]]
    suite = ProbeSuite(spec, tokens, seed=seed, embedding=rnd.embed.weight, features=feats, increments=False,
                       loop=False, **suite_kw)
    hooks = dict(spec.states)
    names = [hooks[f] for f in suite.acc if f in hooks]
    if spec.is_mesh and any(f not in hooks for f in suite.acc):
        names.append(spec.final_memory_hook)
    bar = None
    if suite.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens.shape[0], unit="sample", desc="random-init baseline", leave=False,
                   dynamic_ncols=True)
    try:
        for start, tok, cache, _ in iter_caches(rnd, tokens, names, batch_size, device):
            suite.update(range(start, start + tok.shape[0]), cache)
            if bar is not None:
                bar.update(tok.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return {"model": f"fresh init of the same config (torch.manual_seed({int(seed)}))",
            "features": list(suite.acc), "token": suite.token_results(), "notes": suite.notes}


#: above this many parameters the random-init baseline runs only when asked for (``baseline=True``): it holds
#: a second model in memory and runs a second forward over every sample
BASELINE_AUTO_MAX_PARAMS = 300_000_000


def baseline_wanted(model, baseline: bool | None) -> tuple[bool, str]:
    """Whether to run :func:`random_init_baseline` (``baseline``: True / False, or None = only for models up to
    ``BASELINE_AUTO_MAX_PARAMS`` parameters) and, when not, why (for the notes)."""
    if baseline is not None:
        return bool(baseline), "" if baseline else " (baseline=False)"
    n = sum(p.numel() for p in model.parameters())
    if n <= BASELINE_AUTO_MAX_PARAMS:
        return True, ""
    return False, (f" by default for a model of {n / 1e9:.2f} B parameters (a second model of that size and a "
                   f"second forward; the default runs it up to {BASELINE_AUTO_MAX_PARAMS / 1e6:.0f} M; "
                   "baseline=True runs it)")
