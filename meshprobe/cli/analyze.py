"""`meshprobe analyze CKPT [CKPT ...] [--out DIR]`: diagnostics, probes, router maps and lens -> figures + JSON.

    meshprobe analyze checkpoints/loop3-mesh                    # -> runs/analyze/loop3-mesh
    meshprobe analyze checkpoints/tiny-mesh --out figures/tiny-mesh
    meshprobe analyze ckpt/base ckpt/anchor ckpt/mesh --out figures/cmp --names base,anchor,mesh --samples 500

Output in DIR: ``metrics.json`` (every number behind every figure; keys documented in
``meshprobe.analysis.pipeline.schema.METRICS_KEYS``), ``report.md``, and PNG + PDF figures. One checkpoint: ``fig1``
(paper Fig 1: update bars, RBF-CKA heatmap, spectra), ``cka_linear``, ``lens``, ``probes`` (unless
--no-probes: token / retrieval probes at offsets --offsets, increment over h_emb, loop-step probe, random-init
baseline for models up to 300 M parameters unless --no-baseline, at any size with --baseline), ``router`` (MeSH
only). Several checkpoints: ``fig3`` / ``fig4`` / ``fig5`` / ``lens`` / ``probes`` / ``loop_step`` side by side, and each model's own figures in ``DIR/<name>/``. Everything
is written to a temporary folder beside DIR and moved into DIR only when the whole run succeeded, so earlier
results in DIR survive a failed run. Every file is moved with one atomic rename, metrics.json and report.md
last: a run killed at any instant leaves each file complete (old or new) and a metrics.json that is complete and
describes figures that are in DIR. Like ``meshprobe train``, the run holds the lock ``.DIR.lock`` beside the real
DIR (a second run into DIR stops with exit 2) and removes the staging folders that killed runs left beside DIR.

Tokens: the rows of ``--tokens FILE.npy`` (an integer array [N, seq]), used as they are; else the
checkpoint's own validation sample ``val_tokens.npy`` (bundled checkpoints ship one) unless ``--data`` is
given; else ``--samples`` windows of ``--seq-len`` tokens drawn with ``--seed`` from the validation split of
the checkpoint's training corpus (or ``--data``), tokenized with the checkpoint's tokenizer. Windows drawn from the corpus do not
overlap (when the split is long enough); metrics.json reports the share of probe test windows that share a
16-gram with a probe training window either way.
Models whose tokenizers differ (another tokenizer file, or none and another vocabulary size) are compared only
on the same text, ``--data`` through each model's own tokenizer: with ``--tokens``, or each checkpoint's own
sample, the run stops with one line before any work.


``--dynamics`` adds the loop dynamics (a trajectory to 4K steps or the model's limit with the Jacobian spectra
of every step, cycle detection, exit rules) and ``--tuned-lens`` a tuned lens per loop state (saved in
``DIR/<name>/tuned_lens``; ``--lens DIR`` scores a saved one), for checkpoints and transformers directories:
sections ``dynamics`` / ``tuned_lens`` of metrics.json, figures ``dynamics`` and ``lens_kl`` (docs/dynamics.md).

``--loops K`` (or ``--loops 1,2,...``) runs each looped meshprobe checkpoint with K loop steps (test-time depth:
``load_checkpoint(path, loops=K)``), one model per K named ``NAME@K<K>``; a MeSH model runs at most its trained K.

Transformers model directories (a config.json with ``model_type`` / ``architectures``; the looped LMs Dory,
HRM-Text, Inkling-2 loop, Ouro, Huginn built in, any other with ``--loop-spec FILE.json``): every loop step is a
state (``meshprobe.hf``); tokens from ``--data`` (default shakespeare) through the directory's own tokenizer, or
``--tokens``. ``--loops K`` runs K loop steps instead of the config's; ``--trust-remote-code`` is needed for a
model whose config maps to code in its directory (refused otherwise). The MeSH router analysis and the coda
lens do not apply and are skipped (metrics.json ``notes`` says so).

    meshprobe analyze path/to/dory --out figures/dory --loops 6

A model too big for one device: ``--dtype bfloat16`` (or float16 / float32; the analyses accumulate in float32 /
float64 whatever it is) and ``--device-map auto`` (accelerate: GPUs, CPU, then disk in ``--offload-folder``,
each bounded by ``--max-memory 0=20GiB,cpu=60GiB``); the states are gathered on ``--device``.

Task checkpoints (trained with ``--data task:...``; or ``--data task:...`` given here): the ground-truth
analyses instead (:mod:`meshprobe.analysis.ground_truth`: the t x t' latent map, retention, lens accuracy,
patching) on ``--samples`` evaluation sequences (default 256) of ``--seed``, written as ``ground_truth.json``
and one figure ``<task>.png``.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from meshprobe.errors import UserError

DEFAULT_SAMPLES = 500  # = meshprobe.analysis.pipeline.tokens.DEFAULT_SAMPLES (not imported: --help stays torch-free)
DEFAULT_SEQ_LEN = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint directories")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (figures, metrics.json, report.md; default runs/analyze/NAME, NAME the "
                             "checkpoint folder's name, or NAME1+NAME2+... for several)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"sequences to analyse (default {DEFAULT_SAMPLES}; with --tokens or a bundled "
                             "val_tokens.npy: all rows)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}, at most the model context; "
                             "with --tokens: the file's)")
    parser.add_argument("--data", nargs="+", metavar="SPEC", default=None,
                        help="corpus spec to sample from instead of the checkpoint's training corpus "
                             "(its validation split is used)")
    parser.add_argument("--tokens", metavar="FILE.npy", default=None,
                        help="pre-tokenized sequences: an integer .npy array [N, seq]")
    parser.add_argument("--seed", type=int, default=0, help="sampling and probe seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest on a shared 2-core machine; 0 = torch's default)")
    parser.add_argument("--lens-positions", type=int, default=64,
                        help="positions per sample decoded by the lens, evenly spaced (default 64; 0 = all)")
    parser.add_argument("--no-probes", action="store_true", help="skip the linear probes")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the probes' random-init baseline (a freshly initialised model of the same config; "
                             "by default it runs for models up to 300 M parameters)")
    parser.add_argument("--baseline", action="store_true",
                        help="run the random-init baseline whatever the model's size (a second model in memory and "
                             "a second forward)")
    parser.add_argument("--offsets", default=None, metavar="K,K,...",
                        help="target offsets k of the token probes, x[i+k], each |k| below --seq-len "
                             "(default 0,-1,-2,-4,-8,1; those beyond the windows are noted in the report)")
    parser.add_argument("--probe-l2", choices=("per_offset", "cv"), default="per_offset",
                        help="L2 of the logistic probes: chosen by CV once per offset and shared (default, faster) "
                             "or by CV for every probe")
    parser.add_argument("--max-classes", type=int, default=64,
                        help="token-probe classes: the most frequent target types (default 64)")
    parser.add_argument("--names", default=None, help="comma-separated display names, one per checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--loops", default=None, metavar="K[,K...]",
                        help="test-time depth: run K loop steps instead of the trained / configured ones (checkpoints: "
                             "several K analyse each, named NAME@K<K>)")
    dyn = parser.add_argument_group("loop dynamics (docs/dynamics.md)")
    dyn.add_argument("--dynamics", action="store_true",
                     help="trajectory past the trained K (4K or the model's limit): updates, Jacobian spectra, cycles, "
                          "labels; exit rules (sections 'dynamics' of metrics.json, figure dynamics.png)")
    dyn.add_argument("--tuned-lens", action="store_true",
                     help="fit a tuned lens per loop state and save it (NAME/tuned_lens); KL per state beside the "
                          "logit and coda lenses (section 'tuned_lens', figure lens_kl.png)")
    dyn.add_argument("--lens", metavar="DIR", default=None,
                     help="score this saved tuned lens instead of fitting one (refused for another model)")
    dyn.add_argument("--dynamics-steps", type=int, metavar="N", default=None, help="loop steps to run (default 4K or the limit)")
    dyn.add_argument("--dynamics-samples", type=int, metavar="N", default=4, help="sequences for the dynamics (default 4)")
    dyn.add_argument("--dynamics-seq-len", type=int, metavar="N", default=64, help="their tokens (default 64)")
    dyn.add_argument("--dynamics-iters", type=int, metavar="N", default=20, help="Krylov iterations per spectrum (default 20)")
    dyn.add_argument("--dynamics-k", type=int, metavar="N", default=4, help="singular values / eigenvalues per step (default 4)")
    dyn.add_argument("--lens-samples", type=int, metavar="N", default=32, help="sequences for the tuned lens (default 32)")
    dyn.add_argument("--lens-fit-steps", type=int, metavar="N", default=100, help="Adam steps of the tuned lens (default 100)")
    hf = parser.add_argument_group("transformers model directories")
    hf.add_argument("--loop-spec", metavar="FILE.json", default=None,
                    help="where the loop steps live (default: the built-in spec of the architecture)")
    hf.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model directory's own modeling code (refused without this flag)")
    hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="load the weights in this dtype (default: the checkpoint's own); the analyses accumulate in "
                         "float32 / float64 whatever it is")
    hf.add_argument("--device-map", choices=("auto",), default=None,
                    help="auto: spread a model that does not fit one device over the GPUs, the CPU and disk "
                         "(accelerate's big-model inference; states gathered on --device)")
    hf.add_argument("--max-memory", metavar="DEV=SIZE,...", default=None,
                    help="with --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB (default: what is free)")
    hf.add_argument("--offload-folder", metavar="DIR", default=None,
                    help="with --device-map: where weights that fit no device are offloaded to disk")


def _baseline(args) -> bool | None:
    """--baseline: True, --no-baseline: False, neither: None (by model size)."""
    return True if args.baseline else (False if args.no_baseline else None)


def _validate(args) -> None:
    if args.baseline and args.no_baseline:
        raise UserError("--baseline and --no-baseline exclude each other")
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
    if args.max_classes < 2:
        raise UserError(f"--max-classes must be at least 2, got {args.max_classes}")
    if args.offsets is not None:
        try:
            args.offsets = [int(k) for k in args.offsets.split(",") if k.strip()]
        except ValueError:
            raise UserError(f"--offsets must be comma-separated integers, got {args.offsets!r}") from None
        if not args.offsets:
            raise UserError("--offsets must name at least one offset")
    if args.tokens and args.data:
        raise UserError("give --tokens or --data, not both")
    if args.tokens and not Path(args.tokens).is_file():
        raise UserError(f"tokens file not found: {args.tokens}")
    from meshprobe.cli.eval import parse_loops

    args.loops = parse_loops(args.loops)
    args.dynamics_options = _dynamics_options(args)


def _dynamics_options(args):
    from meshprobe.analysis.pipeline.dynamics import DynamicsOptions, check_options

    opts = DynamicsOptions(dynamics=args.dynamics, tuned_lens=args.tuned_lens, lens=args.lens,
                           steps=args.dynamics_steps, samples=args.dynamics_samples, seq_len=args.dynamics_seq_len,
                           iters=args.dynamics_iters, k=args.dynamics_k, lens_samples=args.lens_samples,
                           fit_steps=args.lens_fit_steps)
    if opts.active:
        check_options(opts)
    return opts


def _hf_dirs(args) -> bool:
    """True when the paths are transformers model directories (all of them; a mix is an error)."""
    from meshprobe.hf.loader import is_hf_dir

    hf = [is_hf_dir(p) for p in args.checkpoints]
    if any(hf) and not all(hf):
        from meshprobe.checkpoint import resolve_checkpoint

        for p in (p for p, h in zip(args.checkpoints, hf) if not h):
            if not resolve_checkpoint(p).exists():  # a missing one says so, rather than "a mix"
                raise UserError(f"checkpoint not found: {p}")
        raise UserError("give either meshprobe checkpoints or transformers model directories, not both")
    if not any(hf):
        for flag, value in (("--loop-spec", args.loop_spec), ("--trust-remote-code", args.trust_remote_code or None),
                            ("--dtype", args.dtype), ("--device-map", args.device_map),
                            ("--max-memory", args.max_memory), ("--offload-folder", args.offload_folder)):
            if value is not None:
                raise UserError(f"{flag} applies to transformers model directories only")
    return all(hf)


def _refuse_remote_code(paths, trust: bool, tokens=None) -> None:
    """A directory whose config maps to remote code needs --trust-remote-code (checked before anything loads)."""
    from meshprobe.hf.loader import read_hf_config, remote_code_reason, tokenizer_remote_reason

    for p in paths:
        reason = remote_code_reason(read_hf_config(p)) or (None if tokens else tokenizer_remote_reason(p))
        if reason and not trust:
            raise UserError(f"{p}: {reason}; it runs only with --trust-remote-code")


def _max_memory(text: str | None) -> dict | None:
    """--max-memory 0=20GiB,cpu=60GiB -> {0: "20GiB", "cpu": "60GiB"} (accelerate's max_memory)."""
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        dev, _, size = item.strip().partition("=")
        if not dev or not size:
            raise UserError(f"--max-memory takes DEV=SIZE,... (e.g. 0=20GiB,cpu=60GiB), got {text!r}")
        out[int(dev) if dev.isdigit() else dev] = int(size) if size.isdigit() else size
    return out


def _run_hf(args, done) -> int:
    from meshprobe.hf.checks import check_hf_dir

    if args.loops and len(args.loops) > 1:
        raise UserError("--loops takes one K for transformers model directories")
    args.max_memory = _max_memory(args.max_memory)
    if (args.max_memory or args.offload_folder) and not args.device_map:
        raise UserError("--max-memory and --offload-folder need --device-map auto")
    rows, cols = _token_file_shape(args.tokens) if args.tokens else (None, None)
    batch = min(args.batch_size, args.samples or rows or DEFAULT_SAMPLES)  # the batches hold at most every sample
    for p in args.checkpoints:  # config, weights' headers, loop counts, sizes, tokenizer: before torch loads
        check_hf_dir(p, spec=args.loop_spec, loops=args.loops[0] if args.loops else None, tokens=bool(args.tokens),
                     trust_remote_code=args.trust_remote_code, batch_size=batch,
                     seq_len=args.seq_len or cols or DEFAULT_SEQ_LEN, dtype=args.dtype, spread=bool(args.device_map))
    from meshprobe.analysis.pipeline.texts import check_same_text
    from meshprobe.hf.loader import read_hf_config

    check_same_text(args.checkpoints, [read_hf_config(p) for p in args.checkpoints], tokens=args.tokens,
                    data=args.data, hf=True)  # tokenizers that differ: the same text only
    from meshprobe.analysis.pipeline.hf_dirs import analyze_hf_dirs

    _refuse_remote_code(args.checkpoints, args.trust_remote_code, args.tokens)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    with _publishing(out) as real:
        moved = analyze_hf_dirs(
            args.checkpoints, real, spec=args.loop_spec, trust_remote_code=args.trust_remote_code,
            loops=args.loops[0] if args.loops else None,
            names=args.names, samples=args.samples, seq_len=args.seq_len, data=args.data, tokens=args.tokens,
            seed=args.seed, device=args.device, batch_size=args.batch_size,
            threads=None if args.threads == 0 else args.threads, lens_positions=args.lens_positions or None,
            probes=not args.no_probes, baseline=_baseline(args), offsets=args.offsets,
            max_classes=args.max_classes, l2_mode=args.probe_l2, progress=not args.no_progress, on_result=_done,
            dtype=args.dtype, device_map=args.device_map, max_memory=args.max_memory,
            offload_folder=args.offload_folder, dynamics=args.dynamics_options)
    print(f"meshprobe analyze: wrote {len(moved)} files to {out} (metrics.json, report.md, figures)")
    return 0


def _token_file_shape(path) -> tuple[int | None, int | None]:
    """(rows, tokens per row) of a .npy token file from its header alone; (None, None) when it has none (the
    analysis reports a bad file in full when it reads it)."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            shape = (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)[0]
    except (OSError, ValueError, TypeError):
        return None, None
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else (None, None)


@contextmanager
def _remote_code_errors(args):
    """An exception inside a directory's own (trusted) code, at load or during the analysis: one line naming
    its file (:func:`meshprobe.hf.loader.remote_code_error`)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        from meshprobe.hf.loader import remote_code_error

        err = remote_code_error(exc, args.checkpoints) if args.trust_remote_code else None
        if err is None:
            raise
        raise err from None


def _check_checkpoints(args) -> None:
    """Every checkpoint's config.json, --loops against it, and tokenizers that differ (compared only on the same
    text), before torch loads."""
    from meshprobe.checkpoint import check_loops, read_checkpoint_config

    configs = [read_checkpoint_config(p) for p in args.checkpoints]
    for p in args.checkpoints if args.loops else []:
        check_loops(p, args.loops)
    from meshprobe.analysis.pipeline.texts import check_same_text

    check_same_text(args.checkpoints, configs, tokens=args.tokens, data=args.data)  # tokenizers that differ


def _is_task_run(args) -> bool:
    from meshprobe.checkpoint import read_checkpoint_config
    from meshprobe.data.tasks import is_task_spec

    if args.data and any(is_task_spec(d) for d in args.data):
        if len(args.data) != 1:
            raise UserError("a task spec (task:...) cannot be combined with other data")
        return True
    return read_checkpoint_config(args.checkpoints[0]).get("metadata", {}).get("task") is not None


def _run_task(args) -> int:
    from meshprobe.paper.task_figures import analyze_task_checkpoints

    names = args.names.split(",") if args.names else None
    moved = analyze_task_checkpoints(args.checkpoints, args.out, names=names, n_sequences=args.samples or 256,
                                     seed=args.seed, data=args.data[0] if args.data else None, loops=args.loops)
    print(f"meshprobe analyze: wrote {len(moved)} files to {args.out} (ground_truth.json and the task figure)")
    return 0


def default_out(checkpoints: list[str]) -> str:
    """runs/analyze/NAME (one checkpoint) or runs/analyze/NAME1+NAME2 (several), relative to the working folder."""
    names = [Path(c).resolve().name or "model" for c in checkpoints]
    return str(Path("runs") / "analyze" / "+".join(names))


@contextmanager
def _publishing(out: Path):
    """Hold the lock ``.OUT.lock`` beside the real output folder (its parents created) and remove the staging
    folders that killed runs left beside it; yields the real path."""
    from meshprobe import _io

    real = _io.real_path(out)
    with _io.created_parents(real), _io.out_lock(real, "analyze"):
        for kind, _, _, folder in _io.leftovers(real):  # staging folders of killed runs (we hold the lock)
            if kind == "tmp":
                _io.remove_dir(folder)
        yield real


def _done(res: dict) -> None:
    print(f"meshprobe analyze: {res['name']}: {res['data']['n_samples']} samples x {res['data']['seq_len']} "
          f"tokens in {res['data']['seconds']:.1f} s", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from meshprobe.checks import check_out_path

    _validate(args)
    if args.out is None:
        args.out = default_out(args.checkpoints)
    check_out_path(args.out, inputs=tuple(args.checkpoints), input_kind="checkpoint")
    if _hf_dirs(args):
        with _remote_code_errors(args):
            return _run_hf(args, _done)
    if _is_task_run(args):
        if args.dynamics_options.active:
            raise UserError("--dynamics / --tuned-lens / --lens apply to text analyses; on task checkpoints use "
                            "meshprobe.dynamics.analyze.task_section (docs/dynamics.md)")
        return _run_task(args)
    _check_checkpoints(args)
    from meshprobe.analysis.pipeline.checkpoints import analyze_checkpoints

    out = Path(args.out)
    with _publishing(out) as real:
        moved = analyze_checkpoints(
            args.checkpoints, real, names=args.names, samples=args.samples, seq_len=args.seq_len, data=args.data,
            tokens=args.tokens, seed=args.seed, device=args.device, batch_size=args.batch_size,
            threads=None if args.threads == 0 else args.threads, lens_positions=args.lens_positions or None,
            probes=not args.no_probes, baseline=_baseline(args), offsets=args.offsets,
            max_classes=args.max_classes, l2_mode=args.probe_l2, progress=not args.no_progress, on_result=_done,
            loops=args.loops, dynamics=args.dynamics_options)
    figs = sorted({f.stem for f in moved if f.suffix == ".png" and f.parent == real})
    print(f"meshprobe analyze: wrote {len(moved)} files to {out} (metrics.json, report.md, figures: "
          f"{', '.join(figs)})")
    return 0
