"""`meshprobe analyze CKPT [CKPT ...] --out DIR`: diagnostics, probes, router maps and lens -> figures + JSON.

    meshprobe analyze checkpoints/tiny-mesh --out figures/tiny-mesh
    meshprobe analyze ckpt/base ckpt/anchor ckpt/mesh --out figures/cmp --names base,anchor,mesh --samples 500

Output in DIR: ``metrics.json`` (every number behind every figure; keys documented in
``meshprobe.analysis.run.METRICS_KEYS``), ``report.md``, and PNG + PDF figures. One checkpoint: ``fig1``
(paper Fig 1: update bars, RBF-CKA heatmap, spectra), ``cka_linear``, ``lens``, ``probes`` (unless
--no-probes), ``router`` (MeSH only). Several checkpoints: ``fig3`` / ``fig4`` / ``fig5`` / ``lens`` side by side,
and each model's own figures in ``DIR/<name>/``. Everything is written to a temporary folder beside DIR and
moved into DIR only when the whole run succeeded, so earlier results in DIR survive a failed run.

Tokens: ``--samples`` windows of ``--seq-len`` tokens drawn with ``--seed`` from the validation split of the
checkpoint's training corpus (or ``--data``), tokenized with the checkpoint's tokenizer; or the rows of
``--tokens FILE.npy`` (an integer array [N, seq]), used as they are.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from meshprobe.errors import UserError

DEFAULT_SAMPLES = 500
DEFAULT_SEQ_LEN = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (figures, metrics.json, report.md)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"sequences to analyse (default {DEFAULT_SAMPLES}; with --tokens: all rows)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}, at most the model context; "
                             "with --tokens: the file's)")
    parser.add_argument("--data", nargs="+", metavar="SPEC", default=None,
                        help="corpus spec to sample from instead of the checkpoint's training corpus "
                             "(its validation split is used)")
    parser.add_argument("--tokens", metavar="FILE.npy", default=None,
                        help="pre-tokenized sequences: an integer .npy array [N, seq]")
    parser.add_argument("--seed", type=int, default=0, help="sampling and control-task seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest on a shared 2-core machine; 0 = torch's default)")
    parser.add_argument("--lens-positions", type=int, default=64,
                        help="positions per sample decoded by the lens, evenly spaced (default 64; 0 = all)")
    parser.add_argument("--no-probes", action="store_true", help="skip the linear probes")
    parser.add_argument("--names", default=None, help="comma-separated display names, one per checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "model"
    return safe


def _names(args, paths: list[Path]) -> list[str]:
    if args.names is not None:
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != len(paths) or any(not n for n in names):
            raise UserError(f"--names needs {len(paths)} non-empty comma-separated names, got {args.names!r}")
        if len({_safe_name(n) for n in names}) != len(names):
            raise UserError(f"--names must be distinct (as folder names), got {args.names!r}")
        return names
    names, seen = [], {}
    for p in paths:
        base = p.resolve().name or "model"
        k = seen.get(base, 0)
        seen[base] = k + 1
        names.append(base if k == 0 else f"{base}-{k + 1}")
    return names


def _load_token_file(path: str):
    import numpy as np

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


def _validate(args) -> None:
    if args.samples is not None and args.samples < 2:
        raise UserError(f"--samples must be at least 2, got {args.samples}")
    if args.seq_len is not None and args.seq_len < 4:
        raise UserError(f"--seq-len must be at least 4, got {args.seq_len}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    if args.lens_positions < 0:
        raise UserError(f"--lens-positions must be >= 0, got {args.lens_positions}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.tokens and args.data:
        raise UserError("give --tokens or --data, not both")


def move_into(tmp: Path, out: Path) -> list[Path]:
    """Move every file of `tmp` to the same relative path in `out` (metrics.json and report.md last)."""
    files = sorted((p for p in tmp.rglob("*") if p.is_file()),
                   key=lambda p: (p.name in ("metrics.json", "report.md"), str(p)))
    moved = []
    for f in files:
        dest = out / f.relative_to(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
        moved.append(dest)
    return moved


def run(args: argparse.Namespace) -> int:
    _validate(args)
    import json

    import numpy as np
    import torch

    import meshprobe
    from meshprobe.analysis import plots, report
    from meshprobe.analysis.run import FORMAT, FORMAT_VERSION, _default_data_spec, analyze_model, sample_tokens
    from meshprobe.checkpoint import load_checkpoint, read_checkpoint_config
    from meshprobe.train import resolve_device

    paths = [Path(p) for p in args.checkpoints]
    configs = [read_checkpoint_config(p) for p in paths]  # fail fast on a bad checkpoint, before any work
    names = _names(args, paths)
    device = resolve_device(args.device)
    token_file = _load_token_file(args.tokens) if args.tokens else None
    if token_file is not None:
        n_rows, n_cols = token_file.shape
        if args.samples is not None and args.samples > n_rows:
            raise UserError(f"--samples {args.samples} but {args.tokens} has only {n_rows} rows")
        if args.seq_len is not None and args.seq_len > n_cols:
            raise UserError(f"--seq-len {args.seq_len} but {args.tokens} has only {n_cols} tokens per row")
    for p, cfg in zip(paths, configs):
        n_ctx = cfg["model"]["n_ctx"]
        want = args.seq_len if args.seq_len is not None else (token_file.shape[1] if token_file is not None else None)
        if want is not None and want > n_ctx:
            raise UserError(f"seq-len {want} is above the context of {p} (n_ctx={n_ctx})")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = None if args.threads == 0 else args.threads
    progress = not args.no_progress
    results = []
    for p, cfg, name in zip(paths, configs, names):
        if token_file is not None:
            rows = args.samples if args.samples is not None else token_file.shape[0]
            cols = args.seq_len if args.seq_len is not None else token_file.shape[1]
            tokens = torch.from_numpy(np.ascontiguousarray(token_file[:rows, :cols]).astype(np.int64))
            source = f"{args.tokens} (rows 0..{rows - 1}, {cols} tokens)"
        else:
            samples = args.samples if args.samples is not None else DEFAULT_SAMPLES
            seq_len = args.seq_len if args.seq_len is not None else min(DEFAULT_SEQ_LEN, cfg["model"]["n_ctx"])
            tokens = sample_tokens(p, samples, seq_len, args.seed, data=args.data)
            spec = args.data if args.data else _default_data_spec(cfg)
            source = f"validation split of {spec if isinstance(spec, str) else ' + '.join(spec)}"
        model = load_checkpoint(p, device=device)
        res = analyze_model(model, tokens, batch_size=args.batch_size, device=device, probes=not args.no_probes,
                            progress=progress, seed=args.seed, name=name, checkpoint=str(p), source=source,
                            threads=threads, lens_positions=args.lens_positions or None)
        results.append(res)
        print(f"meshprobe analyze: {name}: {res['data']['n_samples']} samples x {res['data']['seq_len']} tokens "
              f"in {res['data']['seconds']:.1f} s", file=sys.stderr)
        del model

    doc = {"format": FORMAT, "version": FORMAT_VERSION, "meshprobe_version": meshprobe.__version__,
           "models": results}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if len(results) == 1:
            plots.plot_model(results[0], tmp)
        else:
            plots.plot_comparison(results, names, tmp)
            for res, name in zip(results, names):
                plots.plot_model(res, tmp / _safe_name(name))
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
        report.write_report(doc, tmp / "report.md")
        out.mkdir(parents=True, exist_ok=True)
        moved = move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figs = sorted({f.stem for f in moved if f.suffix == ".png" and f.parent == out})
    print(f"meshprobe analyze: wrote {len(moved)} files to {out} (metrics.json, report.md, figures: "
          f"{', '.join(figs)})")
    return 0
