"""The analysis pipeline: sample tokens, one streaming pass per model (:class:`~meshprobe.analysis.analyzer.
Analyzer`), and one :func:`write_outputs` (metrics.json, report.md, figures) used by both ``meshprobe analyze``
and ``meshprobe figures``.

    from meshprobe.analysis.run import analyze_model, sample_tokens
    tokens = sample_tokens("checkpoints/tiny-mesh", samples=500, seq_len=256, seed=0)
    metrics = analyze_model(model, tokens)          # a JSON-serializable dict (see METRICS_KEYS)
    analyze_checkpoints(["ckpt/base", "ckpt/mesh"], "figures/cmp")   # what `meshprobe analyze` runs

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
* **Probes** (this project's addition; :mod:`meshprobe.analysis.probe_suite`): for every state and MeSH slot
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

import json
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import meshprobe
from meshprobe import _io
from meshprobe.analysis.analyzer import Analyzer
from meshprobe.analysis.collect import check_tokens, iter_caches, state_spec
from meshprobe.analysis.probe_suite import ProbeSuite, random_init_baseline
from meshprobe.analysis.token_probes import DEFAULT_OFFSETS
from meshprobe.analysis.schema import FORMAT, FORMAT_VERSION, METRICS_KEYS, metric_key_paths, to_jsonable
from meshprobe.errors import UserError
from meshprobe.runtime import resolve_device, torch_threads, tune_cpu_allocator

__all__ = ["Analyzer", "analyze_model", "sample_tokens", "analyze_checkpoints", "write_outputs", "METRICS_KEYS",
           "metric_key_paths", "to_jsonable", "FORMAT", "FORMAT_VERSION", "DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN"]

DEFAULT_SAMPLES = 500
DEFAULT_SEQ_LEN = 256


def _model_info(model) -> dict[str, Any]:
    cfg = model.cfg
    return {"kind": "vanilla" if cfg.is_vanilla else "recursive", "layout": cfg.layout, "variant": cfg.variant,
            "d_model": cfg.d_model, "n_loops": cfg.n_loops, "mesh_slots": cfg.mesh_slots,
            "unrolled_depth": cfg.unrolled_depth, "vocab_size": cfg.vocab_size, "n_ctx": cfg.n_ctx,
            "parameters": model.parameter_counts()}


def analyze_model(model, tokens: torch.Tensor, *, batch_size: int = 8, device: str | torch.device | None = None,
                  probes: bool = True, baseline: bool = True, progress: bool = True, seed: int = 0,
                  name: str | None = None, checkpoint: str | None = None, source: str | None = None,
                  sigma_frac: float = 0.5, top: int = 50, offsets: Sequence[int] = DEFAULT_OFFSETS,
                  max_classes: int = 64, l2_mode: str = "per_offset", lens_positions: int | None = 64,
                  threads: int | None = 1, analyzer_out: list | None = None,
                  probe_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run every analysis of this module on ``tokens`` [N, seq] (int) in one streaming pass; returns the
    per-model metrics dict (JSON-serializable, the ``models[]`` entry of metrics.json, see METRICS_KEYS).

    ``device``: where to run (default: the model's device; the model is moved there). ``probes=False`` skips
    the probes (the slowest part); ``baseline=False`` skips the random-init baseline of the probes (a second
    forward pass of a freshly initialised model). ``offsets`` / ``max_classes`` / ``l2_mode``: the token
    probes' target offsets, classes and L2 selection (:mod:`meshprobe.analysis.probe_suite`). ``progress``: a
    tqdm bar over samples on stderr. ``seed`` seeds the probes' split, rows and the random-init model.
    ``threads``: torch CPU threads during the analysis (restored afterwards; ``None`` = leave as is).
    The default 1 is deliberate: on a shared 2-core machine one thread was measured 3-5x faster than two for
    the whole analysis (OpenMP threads wait for each other whenever another process holds a core); raise it on
    an idle many-core machine. ``analyzer_out``: if a list is given, the :class:`Analyzer` is appended to it.
    ``probe_options``: further keywords of :class:`~meshprobe.analysis.probe_suite.ProbeSuite` (row caps etc.).
    """
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if device.type == "cpu":
        tune_cpu_allocator()  # as resolve_device does for the CLI
    model = model.to(device).eval()
    N, seq = tokens.shape
    t0 = time.time()
    spec = state_spec(model)
    probe_kw = dict(offsets=offsets, max_classes=max_classes, seed=seed, l2_mode=l2_mode, **(probe_options or {}))
    suite = ProbeSuite(spec, tokens, embedding=model.embed.weight, **probe_kw) if probes else None
    an = Analyzer(model, N, probe_suite=suite, seed=seed, sigma_frac=sigma_frac, top=top,
                  lens_positions=lens_positions)
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
            if out["probes"] is not None:
                base = None
                if baseline and any(f in spec.state_names for f in suite.acc):
                    base = random_init_baseline(model, tokens, batch_size=batch_size, device=device, **probe_kw)
                    out["notes"] += base.pop("notes")
                else:
                    out["notes"].append("random-init baseline of the probes skipped" + ("" if baseline else
                                                                                         " (--no-baseline)"))
                out["probes"]["random_init"] = to_jsonable(base)
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


def default_data_spec(config: Mapping[str, Any]):
    """The corpus a checkpoint was trained on (its train metadata), else shakespeare."""
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
    (non-overlapping windows, :func:`~meshprobe.analysis.stats.sample_disjoint_windows`, when the split holds
    ``samples * seq_len`` tokens; else possibly overlapping ones) of the checkpoint's training corpus (``metadata.train.data``; ``data`` overrides it), tokenized with the
    checkpoint's tokenizer. ``ckpt``: a checkpoint path, or a loaded model (then pass ``tokenizer``; the corpus
    comes from ``model.checkpoint_config`` or ``data``). Returns a LongTensor [samples, seq_len]."""
    from meshprobe import data as D
    from meshprobe.checkpoint import read_checkpoint_config

    if samples < 2:
        raise UserError(f"need at least 2 samples, got {samples}")
    if isinstance(ckpt, (str, os.PathLike)):
        config = read_checkpoint_config(ckpt)
        tok = tokenizer or D.load_tokenizer(ckpt, missing_ok=True)
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
    spec = data if data else default_data_spec(config)
    corpus = D.open_corpus(spec, quiet=True)
    ids = D.tokenize_corpus(corpus, tok)[split]
    if len(ids) < seq_len:
        raise UserError(f"data {corpus.name}: only {len(ids)} {split} tokens, need at least seq_len = {seq_len}")
    if samples * seq_len <= len(ids):  # non-overlapping windows (no position is shared by two windows)
        from meshprobe.analysis.stats import sample_disjoint_windows

        return torch.from_numpy(sample_disjoint_windows(ids, samples, seq_len, seed))
    return torch.from_numpy(D.sample_sequences(ids, samples, seq_len, seed))


# ---------------------------------------------------------------------------------------------------------
# checkpoints in, files out: `meshprobe analyze`
# ---------------------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A display name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "model"


def display_names(names: str | None, paths: Sequence[Path]) -> list[str]:
    """One display name per checkpoint: the comma-separated `names`, else the folder names (made distinct)."""
    if names is not None:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(paths) or any(not n for n in out):
            raise UserError(f"--names needs {len(paths)} non-empty comma-separated names, got {names!r}")
        if len({safe_name(n) for n in out}) != len(out):
            raise UserError(f"--names must be distinct (as folder names), got {names!r}")
        return out
    out, seen = [], {}
    for p in paths:
        base = p.resolve().name or "model"
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append(base if k == 0 else f"{base}-{k + 1}")
    return out


def load_token_file(path: str | os.PathLike) -> np.ndarray:
    """A pre-tokenized ``.npy`` integer array [N, seq] (never unpickled); UserError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--tokens: file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"--tokens {p}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise UserError(f"--tokens {p}: need a 2-d integer array [N, seq], got "
                        f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")
    return arr


def _check_shapes(configs: list[dict], paths: list[Path], token_file, tokens_path, samples, seq_len) -> None:
    if token_file is not None:
        n_rows, n_cols = token_file.shape
        if samples is not None and samples > n_rows:
            raise UserError(f"--samples {samples} but {tokens_path} has only {n_rows} rows")
        if seq_len is not None and seq_len > n_cols:
            raise UserError(f"--seq-len {seq_len} but {tokens_path} has only {n_cols} tokens per row")
    for p, cfg in zip(paths, configs):
        n_ctx = cfg["model"]["n_ctx"]
        want = seq_len if seq_len is not None else (token_file.shape[1] if token_file is not None else None)
        if want is not None and want > n_ctx:
            raise UserError(f"seq-len {want} is above the context of {p} (n_ctx={n_ctx})")


def _tokens_for(model, path: Path, token_file, tokens_path, samples, seq_len, seed, data):
    """(tokens [N, seq], source description) for one checkpoint: rows of the token file, or a sample of the
    validation split of its corpus (``data`` overrides it)."""
    if token_file is not None:
        rows = samples if samples is not None else token_file.shape[0]
        cols = seq_len if seq_len is not None else token_file.shape[1]
        tokens = torch.from_numpy(np.ascontiguousarray(token_file[:rows, :cols]).astype(np.int64))
        return tokens, f"{tokens_path} (rows 0..{rows - 1}, {cols} tokens)"
    from meshprobe.data import load_tokenizer

    samples = samples if samples is not None else DEFAULT_SAMPLES
    seq_len = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, model.cfg.n_ctx)
    tokenizer = load_tokenizer(path, missing_ok=True)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.json: pass pre-tokenized sequences with --tokens FILE.npy")
    tokens = sample_tokens(model, samples, seq_len, seed, data=data, tokenizer=tokenizer)
    spec = data if data else default_data_spec(model.checkpoint_config)
    return tokens, f"validation split of {spec if isinstance(spec, str) else ' + '.join(spec)}"


def analyze_checkpoints(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        names: str | None = None, samples: int | None = None, seq_len: int | None = None,
                        data=None, tokens: str | os.PathLike | None = None, seed: int = 0, device: str = "auto",
                        batch_size: int = 8, threads: int | None = 1, lens_positions: int | None = 64,
                        probes: bool = True, baseline: bool = True, offsets: Sequence[int] = DEFAULT_OFFSETS,
                        max_classes: int = 64, l2_mode: str = "per_offset", progress: bool = True,
                        on_result: Callable[[dict], None] | None = None) -> list[Path]:
    """Analyse checkpoints and write ``out`` (metrics.json, report.md, figures; see :func:`write_outputs`).

    Every checkpoint's config is checked before any work. Tokens: ``samples`` windows of ``seq_len`` tokens
    drawn with ``seed`` from the validation split of each checkpoint's corpus (or ``data``), or the rows of the
    ``tokens`` .npy file. ``on_result`` is called with each model's metrics as it finishes. Returns the files.
    """
    from meshprobe.checkpoint import load_checkpoint, read_checkpoint_config

    paths = [Path(p) for p in checkpoints]
    configs = [read_checkpoint_config(p) for p in paths]  # fail fast on a bad checkpoint, before any work
    labels = display_names(names, paths)
    dev = resolve_device(device)
    token_file = load_token_file(tokens) if tokens else None
    _check_shapes(configs, paths, token_file, tokens, samples, seq_len)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    results = []
    for p, name in zip(paths, labels):
        model = load_checkpoint(p, device=dev)
        toks, source = _tokens_for(model, p, token_file, tokens, samples, seq_len, seed, data)
        res = analyze_model(model, toks, batch_size=batch_size, device=dev, probes=probes, baseline=baseline,
                            offsets=offsets, max_classes=max_classes, l2_mode=l2_mode, progress=progress,
                            seed=seed, name=name, checkpoint=str(p), source=source, threads=threads,
                            lens_positions=lens_positions)
        results.append(res)
        if on_result is not None:
            on_result(res)
        del model
    return write_outputs(out, results, lambda tmp: plot_analysis(results, labels, tmp))


def plot_analysis(results: list[dict], names: list[str], out_dir: Path) -> None:
    """The figures of ``meshprobe analyze``: one model's figures, or the comparison plus each model's own
    figures in ``<name>/``."""
    from meshprobe.analysis import plots

    if len(results) == 1:
        plots.plot_model(results[0], out_dir)
        return
    plots.plot_comparison(results, names, out_dir)
    for res, name in zip(results, names):
        plots.plot_model(res, out_dir / safe_name(name))


def write_outputs(out: str | os.PathLike, models: list[dict], plot: Callable[[Path], Any],
                  extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write an analysis folder: ``plot(folder)`` draws the figures (and any other files), then metrics.json
    (``{"format", "version", "meshprobe_version", "models", **extra}``) and report.md. Everything is written
    into a temp folder beside ``out`` and moved in only when complete, so a failure leaves earlier results
    intact. Returns the files written."""
    from meshprobe.analysis import report

    out = Path(out)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "meshprobe_version": meshprobe.__version__,
           "models": models, **(extra or {})}
    with _io.staging_dir(out) as tmp:
        plot(tmp)
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
        report.write_report(doc, tmp / "report.md")
        out.mkdir(parents=True, exist_ok=True)
        return _io.move_into(tmp, out)
