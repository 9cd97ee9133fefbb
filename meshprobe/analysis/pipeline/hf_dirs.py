"""`meshprobe analyze` on transformers model directories (looped LMs wrapped by :mod:`meshprobe.hf`).

The same pass as for meshprobe's own checkpoints (:func:`~meshprobe.analysis.pipeline.checkpoints.analyze_and_write`:
the same metrics.json keys and figures, the same token resolver); what differs is how a model loads:
:func:`meshprobe.hf.loader.load` (built-in or user loop spec, remote code only when trusted, ``loops`` = test-time
depth). Tokens (:func:`~meshprobe.analysis.pipeline.tokens.resolve_tokens`) come from ``tokens`` (a .npy file) or
from the validation split of ``data`` (default shakespeare) encoded with the directory's own tokenizer. Analyses
that need meshprobe's internals (MeSH routers, the coda lens) are skipped and metrics.json's ``notes`` say so.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from meshprobe.analysis.pipeline.checkpoints import analyze_and_write
from meshprobe.analysis.pipeline.outputs import display_names
from meshprobe.analysis.pipeline.tokens import TokenRequest, check_same_text, check_token_shapes
from meshprobe.analysis.probes.tokens import DEFAULT_OFFSETS
from meshprobe.errors import UserError
from meshprobe.hf.hooked import CTX_FIELDS
from meshprobe.runtime import resolve_device

__all__ = ["analyze_hf_dirs"]


def _check(paths: list[Path], trust_remote_code: bool, spec, request: TokenRequest, tokens_path, loops=None):
    """Every input validated before any model loads (each directory's config, weights and loop count too, so a
    damaged second directory is refused before the first one is analyzed)."""
    from meshprobe.hf import as_spec
    from meshprobe.hf.checks import TOKENIZER_FILES, check_hf_dir
    from meshprobe.hf.loader import remote_code_reason, tokenizer_remote_reason

    configs = [check_hf_dir(p, spec=spec, loops=loops, trust_remote_code=trust_remote_code,
                            tokens=request.tokens is not None, spread=True) for p in paths]
    for p, config in zip(paths, configs):
        reason = remote_code_reason(config) or (tokenizer_remote_reason(p) if request.tokens is None else None)
        if reason and not trust_remote_code:
            raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
        if request.tokens is None and not any((p / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"{p} has no tokenizer: pass pre-tokenized sequences (tokens=FILE.npy)")
    if spec is not None:
        as_spec(spec)
    n_ctx = [next((c[k] for k in CTX_FIELDS if isinstance(c.get(k), int)), 1 << 40) for c in configs]
    check_token_shapes([{"model": {"n_ctx": n}} for n in n_ctx], paths, request.tokens, tokens_path, request.samples,
                       request.seq_len)
    check_same_text(paths, configs, tokens=tokens_path and str(tokens_path), data=request.data, hf=True)


def analyze_hf_dirs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, spec=None,
                    trust_remote_code: bool = False, loops: int | None = None, names: str | None = None,
                    samples: int | None = None, seq_len: int | None = None, data=None,
                    tokens: str | os.PathLike | None = None, seed: int = 0, device: str = "auto", batch_size: int = 8,
                    threads: int | None = None, lens_positions: int | None = 64, probes: bool = True,
                    baseline: bool = True, offsets: Sequence[int] | None = None, max_classes: int = 64,
                    l2_mode: str = "per_offset", progress: bool = True,
                    on_result: Callable[[dict], None] | None = None, dtype: str | None = None,
                    device_map=None, max_memory: dict | None = None,
                    offload_folder: str | os.PathLike | None = None, dynamics=None) -> list[Path]:
    """Analyse transformers model directories and write ``out`` like
    :func:`~meshprobe.analysis.pipeline.checkpoints.analyze_checkpoints` (metrics.json, report.md, figures).
    ``spec``: a loop spec for every directory (default: the built-in one of each architecture); ``loops``: run
    every model with this many loop steps. ``offsets``: None = DEFAULT_OFFSETS. ``dtype``: the weights' dtype
    ("float32" / "bfloat16" / "float16"; default the checkpoint's own; the analyses accumulate in float32 and
    float64 whatever it is). ``device_map`` / ``max_memory`` / ``offload_folder``: accelerate's big-model
    inference for a model that does not fit one device (:func:`meshprobe.hf.loader.load`; the states are then
    gathered on ``device``). ``dynamics``: loop dynamics / tuned lens options
    (:class:`~meshprobe.analysis.pipeline.dynamics.DynamicsOptions`). Every input is checked before any model
    loads. Returns the files."""
    from meshprobe.hf import load

    paths = [Path(p) for p in dirs]
    request = TokenRequest(tokens, samples, seq_len, seed, data).opened()
    _check(paths, trust_remote_code, spec, request, tokens, loops)
    if dynamics is not None and dynamics.active:
        from meshprobe.analysis.pipeline.dynamics import check_options

        check_options(dynamics)
    labels = display_names(names, paths)
    dev = resolve_device(device)  # where the analysis runs (and the model, without a device_map)
    big = dict(dtype=dtype, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
               device=None if device_map is not None else dev)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a folder")
    return analyze_and_write(
        [(p, name, None) for p, name in zip(paths, labels)], out, labels,
        lambda p, _: load(p, spec=spec, trust_remote_code=trust_remote_code, loops=loops, **big), request,
        on_result, batch_size=batch_size, device=dev, probes=probes, baseline=baseline,
        offsets=DEFAULT_OFFSETS if offsets is None else offsets, max_classes=max_classes, l2_mode=l2_mode,
        progress=progress, seed=seed, threads=threads, lens_positions=lens_positions, dynamics=dynamics)
