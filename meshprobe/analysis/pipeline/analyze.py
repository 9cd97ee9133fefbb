"""The analysis of one model: its tokens (:mod:`meshprobe.analysis.pipeline.tokens`), one streaming pass
(:class:`~meshprobe.analysis.pipeline.analyzer.Analyzer`), the metrics as a dict. Writing files from checkpoints
(``meshprobe analyze``) is :mod:`meshprobe.analysis.pipeline.checkpoints`.

    import meshprobe as mp
    m = mp.analyze("checkpoints/loop3-mesh", samples=64)   # Metrics: a dict (one models[] entry of metrics.json)
    m["relative_update"]; m.plot("out/")                  # the figures one call away
    metrics = analyze_model(model, tokens)                # the same on a loaded model and a token tensor

Memory does not grow with N: every batch ``[b, seq]`` is run through ``model.run_with_cache`` (only the
state / mesh hooks are cached, :mod:`meshprobe.analysis.pipeline.collect`), folded into fixed-size accumulators
(``RunningStats`` for per-sample numbers, the probes' sufficient statistics) and dropped. ``Analyzer.nbytes``
reports the accumulator size; it is the same for every N once the first batch has been seen.

What is computed (every choice the paper leaves open is stated here and in ``notes`` of the output)
-----------------------------------------------------------------------------------------------
* **Relative update** ``r(f, h) = 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F)`` per sample (Frobenius norm over
  the sample's ``[seq, d]`` matrix) for each block of :func:`~meshprobe.analysis.pipeline.collect.state_spec` (prelude,
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
* **Probes** (this project's addition; :mod:`meshprobe.analysis.probes.suite`): for every state and MeSH slot
  (after the last write), the balanced multinomial logistic token probe and the embedding-retrieval probe
  (ridge onto the model's input embedding, nearest type among the whole vocabulary) for the target x_{i+k} at
  ``offsets`` (default 0, -1, -2, -4, -8, +1), the increment over h_emb, and (recursive models, K >= 2) the
  loop-step probe on h^(t+1), the update, their unit-normalized versions and the norm alone; split by
  sequence (seeded hash, 30% test), 95% bootstrap CIs over test sequences. Baselines (``probes.config.
  baselines``): chance 1/C, h_emb, the increment, and the same token probes on a freshly initialised model of
  the same config (``baseline=True``; on the state before h_out only, to bound the cost); the loop-step probe
  has chance 1/K, a permutation null and a norm-only probe. The share of test windows that share a 16-gram
  with a training window is reported (``shared_16gram_fraction``). Memory: the planned rows' features (a few
  thousand per offset) and the ridge statistics per feature space, independent of N.
* **MeSH routers** (steps ``entry``, ``loop 1`` ... ``loop K``; slots ``m0`` ...): per sample the mean write and
  read weight of each slot (mean over tokens), then mean / std over samples; per-token router entropy
  ``-sum_b w_b log w_b`` (nats; max ``log B``), mean / std over all tokens; ``write_read_overlap`` =
  ``sum_b w_write,b w_read,b`` per token (the coefficient of f_core(h^(t)) in h^(t+1), paper Prop. 2.1),
  mean / std over samples of its per-sample mean; ``slot_norm`` = L2 norm of each slot after the step's write,
  mean over tokens per sample, then mean / std over samples.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from meshprobe.analysis.pipeline.analyzer import Analyzer
from meshprobe.analysis.pipeline.collect import check_tokens, iter_caches, state_spec
from meshprobe.analysis.pipeline.outputs import write_outputs
from meshprobe.analysis.pipeline.schema import METRICS_KEYS, metric_key_paths, to_jsonable
from meshprobe.analysis.pipeline.tokens import TokenRequest, resolve_tokens
from meshprobe.analysis.probes.suite import ProbeSuite, baseline_wanted, random_init_baseline
from meshprobe.analysis.probes.tokens import DEFAULT_OFFSETS
from meshprobe.runtime import torch_threads

__all__ = ["Analyzer", "Metrics", "analyze", "analyze_model", "METRICS_KEYS", "metric_key_paths", "to_jsonable"]


def _model_info(model) -> dict[str, Any]:
    cfg = model.cfg
    return {"kind": "vanilla" if cfg.is_vanilla else "recursive", "layout": cfg.layout, "variant": cfg.variant,
            "d_model": cfg.d_model, "n_loops": cfg.n_loops, "mesh_slots": cfg.mesh_slots,
            "unrolled_depth": cfg.unrolled_depth, "vocab_size": cfg.vocab_size, "n_ctx": cfg.n_ctx,
            "parameters": model.parameter_counts()}


def _place(model, device) -> tuple[Any, torch.device, bool]:
    """``(model, device, spread)``: a model that accelerate spread over devices (``device_map``: GPUs, CPU, disk)
    stays where it is and the analysis runs on ``device`` (default CPU; its hooks move every input to the
    weights); any other model moves to ``device`` (default: its own)."""
    spread = bool(getattr(getattr(model, "hf", None), "hf_device_map", None))
    if device is None:
        device = "cpu" if spread else next(model.parameters()).device
    device = torch.device(device)
    return (model if spread else model.to(device)).eval(), device, spread


def _embedding(model) -> torch.Tensor:
    """The input embedding matrix [V, e] (the retrieval probe's code), read through the module when accelerate
    offloaded its weight (on the meta device until the module runs)."""
    w = model.embed.weight
    if w.device.type != "meta":
        return w
    with torch.no_grad():
        return model.embed(torch.arange(w.shape[0]))


def analyze_model(model, tokens: torch.Tensor, *, batch_size: int = 8, device: str | torch.device | None = None,
                  probes: bool = True, baseline: bool | None = None, progress: bool = True, seed: int = 0,
                  name: str | None = None, checkpoint: str | None = None, source: str | None = None,
                  sigma_frac: float = 0.5, top: int = 50, offsets: Sequence[int] = DEFAULT_OFFSETS,
                  max_classes: int = 64, l2_mode: str = "per_offset", lens_positions: int | None = 64,
                  threads: int | None = None,
                  probe_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run every analysis of this module on ``tokens`` [N, seq] (int) in one streaming pass; returns the
    per-model metrics dict (JSON-serializable, the ``models[]`` entry of metrics.json, see METRICS_KEYS).

    ``device``: where to run (default: the model's device; the model is moved there). ``probes=False`` skips
    the probes (the slowest part); ``baseline=False`` skips the random-init baseline of the probes (a second
    forward pass of a freshly initialised model), ``None`` runs it for models up to 300 M parameters
    (:func:`~meshprobe.analysis.probes.suite.baseline_wanted`; the notes say when it was skipped). ``offsets`` / ``max_classes`` / ``l2_mode``: the token
    probes' target offsets, classes and L2 selection (:mod:`meshprobe.analysis.probes.suite`). ``progress``: a
    tqdm bar over samples on stderr. ``seed`` seeds the probes' split, rows and the random-init model.
    ``threads``: torch CPU threads during the analysis (restored afterwards; ``None`` = leave as is). On a
    shared 2-core machine one thread was measured 3-5x faster than two for the whole analysis (OpenMP threads
    wait for each other whenever another process holds a core), so ``meshprobe analyze`` passes 1; results
    differ between thread counts only in float rounding.
    ``probe_options``: further keywords of :class:`~meshprobe.analysis.probes.suite.ProbeSuite` (row caps etc.).
    """
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    model, device, spread = _place(model, device)
    N, seq = tokens.shape
    t0 = time.time()
    spec = state_spec(model)
    probe_kw = dict(offsets=offsets, max_classes=max_classes, seed=seed, l2_mode=l2_mode, progress=progress,
                    **(probe_options or {}))
    suite = ProbeSuite(spec, tokens, embedding=_embedding(model), **probe_kw) if probes else None
    an = Analyzer(model, N, probe_suite=suite, seed=seed, sigma_frac=sigma_frac, top=top,
                  lens_positions=lens_positions)
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
            if out["probes"] is not None:
                base, (run_base, why) = None, baseline_wanted(model, baseline)
                if spread and run_base:  # a second, random copy of a model spread over devices would not fit
                    run_base, why = False, (" (the model is spread over devices by a device_map: a second, "
                                            "random copy would not fit either)")
                if run_base and any(f in spec.state_names for f in suite.acc):
                    t_base = time.perf_counter()
                    base = random_init_baseline(model, tokens, batch_size=batch_size, device=device, **probe_kw)
                    out["notes"] += base.pop("notes")
                    out["timing"]["random_init_baseline"] = round(time.perf_counter() - t_base, 3)
                else:
                    out["notes"].append("random-init baseline of the probes skipped" + why)
                out["probes"]["random_init"] = to_jsonable(base)
    finally:
        if bar is not None:
            bar.close()
    result = {
        "name": name or (Path(checkpoint).name if checkpoint else f"{cfg.layout}-{cfg.variant}"),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "model": to_jsonable(_model_info(model)),
        "data": {"source": source or "tokens given to analyze_model", "n_samples": N, "seq_len": seq, "seed": seed,
                 "batch_size": batch_size, "device": str(device), "seconds": round(time.time() - t0, 3),
                 "accumulator_bytes": an.nbytes},
    }
    result.update(out)
    return result


class Metrics(dict):
    """One model's metrics: a plain dict (the ``models[]`` entry of metrics.json; every key is documented in
    ``METRICS_KEYS``), with the figures and the report one call away."""

    def plot(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write this model's figures (PNG + PDF: fig1, cka_linear, lens, probes, router for MeSH) into
        ``out_dir``; returns the paths."""
        from meshprobe.analysis.plots import diagnostics

        return diagnostics.plot_model(self, out_dir)

    def report(self) -> str:
        """report.md's text for this model."""
        from meshprobe.analysis.report import render_report

        return render_report({"models": [dict(self)]})

    def save(self, out: str | os.PathLike) -> list[Path]:
        """Write ``out`` as ``meshprobe analyze`` does (metrics.json, report.md, figures; atomically)."""
        return write_outputs(out, [dict(self)], self.plot)

    def _repr_markdown_(self) -> str:  # Jupyter shows the report
        return self.report()


def analyze(model, tokens=None, *, samples: int | None = None, seq_len: int | None = None, data=None,
            seed: int = 0, device: str | torch.device | None = None, name: str | None = None, **options) -> Metrics:
    """Analyze a model, the notebook way: ``mp.analyze("checkpoints/loop3-mesh")`` -> :class:`Metrics`.

    ``model``: a loaded model or a checkpoint folder (loaded on ``device``, default CPU), or a transformers
    looped LM (a folder, or a model from :func:`meshprobe.hf.load`: tokens through its own tokenizer). ``tokens``: an
    integer tensor / array [N, seq], a ``.npy`` path, or None: then
    :func:`~meshprobe.analysis.pipeline.tokens.resolve_tokens` picks them (the checkpoint's own
    ``val_tokens.npy``, else ``samples`` windows of ``seq_len`` from its corpus or ``data``; a transformers
    model's tokenizer on ``data``; a task checkpoint's evaluation sequences). ``samples`` / ``seq_len`` also cut
    a given token array. Every other keyword goes to
    :func:`analyze_model` (``probes``, ``baseline``, ``batch_size``, ``offsets``, ``progress``, ``threads``,
    ...). Nothing process-wide is changed (threads are restored; the CPU allocator is left alone).
    """
    path = None
    if isinstance(model, (str, os.PathLike)):
        from meshprobe.checkpoint import load_checkpoint
        from meshprobe.hf.loader import is_hf_dir, load

        loader = load if is_hf_dir(model) else load_checkpoint  # a transformers looped LM (meshprobe.hf)
        path, model = Path(model), loader(model, device=device or "cpu")
    elif getattr(model, "checkpoint_dir", None) is not None:
        path = Path(model.checkpoint_dir)
    tokens, source = resolve_tokens(model, path, TokenRequest(tokens, samples, seq_len, seed, data))
    result = analyze_model(model, tokens, device=device, seed=seed, source=source,
                           name=name or (path.name if path else None),
                           checkpoint=str(path) if path else None, **options)
    return Metrics(result)
