"""Checkpoints in, files out: what ``meshprobe analyze`` runs on meshprobe checkpoints
(:func:`analyze_checkpoints`), and the loop both it and transformers directories share (:func:`analyze_and_write`:
load one model, :func:`~meshprobe.analysis.pipeline.tokens.resolve_tokens`, :func:`analyze_model`, drop it;
then :func:`~meshprobe.analysis.pipeline.outputs.write_outputs`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from meshprobe.analysis.pipeline.analyze import analyze_model
from meshprobe.analysis.pipeline.outputs import display_names, plot_analysis, safe_name, write_outputs
from meshprobe.analysis.pipeline.tokens import (TokenRequest, check_same_text, check_token_shapes, resolve_tokens,
                                                token_shape)
from meshprobe.analysis.probes.tokens import DEFAULT_OFFSETS
from meshprobe.checks import check_fits, check_out_path
from meshprobe.errors import UserError
from meshprobe.runtime import resolve_device

__all__ = ["analyze_checkpoints", "analyze_and_write"]


def _check_inputs(paths: list[Path], configs: list[dict], out: Path, offsets, **token_args) -> None:
    """Everything :func:`analyze_checkpoints` can check before the first checkpoint is analyzed: the output
    folder (not one of the checkpoints, nor inside one), no task checkpoint among them, every checkpoint's
    tokens (:func:`~meshprobe.analysis.pipeline.tokens.token_shape`), given offsets inside the windows, and
    the token arrays against this machine's memory."""
    check_out_path(out, inputs=tuple(paths), input_kind="checkpoint")
    for p, cfg in zip(paths, configs):
        task = cfg.get("metadata", {}).get("task")
        if task is not None:
            raise UserError(f"{p} was trained on a task ({task.get('name')}); analyze task checkpoints on their "
                            "own (their ground-truth analyses differ)")
        rows, window = token_shape(p, cfg, **token_args)
        wrong = [k for k in offsets or () if abs(k) >= window]
        if wrong:
            raise UserError(f"offsets={','.join(map(str, wrong))}: outside the {window}-token windows of {p} "
                            f"(each |k| must be below {window})")
        check_fits(8 * rows * window, f"samples={rows} (windows of {window} tokens)")


def analyze_checkpoints(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        names: str | None = None, samples: int | None = None, seq_len: int | None = None,
                        data=None, tokens: str | os.PathLike | None = None, seed: int = 0, device: str = "auto",
                        batch_size: int = 8, threads: int | None = None, lens_positions: int | None = 64,
                        probes: bool = True, baseline: bool = True, offsets: Sequence[int] | None = None,
                        max_classes: int = 64, l2_mode: str = "per_offset", progress: bool = True,
                        on_result: Callable[[dict], None] | None = None,
                        loops: Sequence[int] | None = None, dynamics=None) -> list[Path]:
    """Analyse checkpoints and write ``out`` (metrics.json, report.md, figures; see :func:`write_outputs`).

    Every checkpoint's config is checked before any work. Tokens (:func:`~meshprobe.analysis.pipeline.tokens.
    resolve_tokens`): the rows of the ``tokens`` .npy file; else the checkpoint's own validation sample
    (``val_tokens.npy``, shipped with bundled checkpoints) unless ``data`` is given; else ``samples`` windows of
    ``seq_len`` tokens drawn with ``seed`` from the validation split of its corpus (or ``data``). Every input
    is checked before the first checkpoint is analyzed (:func:`_check_inputs`). ``offsets``: the token probes'
    offsets (None: DEFAULT_OFFSETS, any beyond the windows noted in the report; given ones must lie inside the
    windows). ``on_result`` is called with each model's metrics as it finishes. Returns the files.
    ``dynamics``: a :class:`~meshprobe.analysis.pipeline.dynamics.DynamicsOptions` (loop dynamics, tuned lens).
    ``loops``: analyse every checkpoint at each of these loop counts (test-time depth, ``load_checkpoint(path,
    loops=K)``), one model entry per (checkpoint, K) named ``<name>@K<K>``.
    """
    from meshprobe.checkpoint import check_loops, load_checkpoint, read_checkpoint_config

    paths = [Path(p) for p in checkpoints]
    configs = [read_checkpoint_config(p) for p in paths]  # fail fast on a bad checkpoint, before any work
    labels = display_names(names, paths)
    for p in paths if loops else []:
        check_loops(p, loops)
    runs = [(p, f"{name}@K{k}" if k else name, k) for p, name in zip(paths, labels) for k in (loops or [None])]
    labels = [name for _, name, _ in runs]
    dev = resolve_device(device)
    request = TokenRequest(tokens, samples, seq_len, seed, data).opened()
    check_same_text(paths, configs, tokens=tokens and str(tokens), data=data)  # tokenizers that differ: same text
    check_token_shapes(configs, paths, request.tokens, tokens, samples, seq_len)
    out = Path(out)
    _check_inputs(paths, configs, out, offsets, token_file=request.tokens, samples=samples, seq_len=seq_len,
                  data=data)
    check_dynamics_configs(paths, configs, dynamics)
    return analyze_and_write(
        runs, out, labels, lambda p, k: load_checkpoint(p, device=dev, loops=k), request, on_result,
        batch_size=batch_size, device=dev, probes=probes, baseline=baseline,
        offsets=DEFAULT_OFFSETS if offsets is None else offsets, max_classes=max_classes, l2_mode=l2_mode,
        progress=progress, seed=seed, threads=threads, lens_positions=lens_positions, dynamics=dynamics)


def analyze_and_write(runs: Sequence[tuple[Path, str, Any]], out: Path, labels: list[str],
                      load_one: Callable[[Path, Any], Any], request: TokenRequest,
                      on_result: Callable[[dict], None] | None = None, dynamics=None, **analysis) -> list[Path]:
    """One model in memory at a time: for each ``(path, name, extra)`` of ``runs``, ``load_one(path, extra)``,
    its tokens (:func:`~meshprobe.analysis.pipeline.tokens.resolve_tokens` under ``request``),
    :func:`analyze_model` with ``analysis`` (and the loop dynamics sections when ``dynamics`` asks for them);
    then :func:`write_outputs` once. Shared by meshprobe checkpoints and transformers directories."""
    from meshprobe.analysis.pipeline.dynamics import dynamics_entry, write_dynamics

    results, lenses = [], []
    for path, name, extra in runs:
        model = load_one(path, extra)
        tokens, source = resolve_tokens(model, path, request)
        res = analyze_model(model, tokens, name=name, checkpoint=str(path), source=source, **analysis)
        sections, lens = dynamics_entry(model, tokens, dynamics) if dynamics is not None else ({}, None)
        res.update(sections)
        results.append(res)
        lenses.append(lens)
        if on_result is not None:
            on_result(res)
        del model

    def plot(tmp: Path) -> None:
        plot_analysis(results, labels, tmp)
        if dynamics is not None and dynamics.active:
            write_dynamics(tmp, results, lenses, [safe_name(n) for n in labels])

    return write_outputs(out, results, plot)


def check_dynamics_configs(paths: list[Path], configs: list[dict], dynamics) -> None:
    """--dynamics / --tuned-lens on checkpoints: looped models that run the steps asked for (before any work)."""
    if dynamics is None or not dynamics.active:
        return
    from meshprobe.analysis.pipeline.dynamics import check_model_config, check_options
    from meshprobe.config import ModelConfig

    check_options(dynamics)
    for p, cfg in zip(paths, configs):
        check_model_config(ModelConfig.from_dict(cfg["model"]), dynamics, str(p))


