"""`meshprobe train`: train a vanilla, recursive or MeSH model from a preset plus ``--key value`` overrides.

    meshprobe train --config tiny --out checkpoints/tiny
    meshprobe train --config loop3 --variant mesh --lr 1e-3 --steps 2000 --out checkpoints/loop3-mesh
    meshprobe train --out checkpoints/tiny --resume --steps 400          # continue (config from the checkpoint)
    torchrun --nproc_per_node 4 -m meshprobe train --config gpu-small --out checkpoints/gpu-small

Exit codes: 0 done (or stopped by stop_after), 1 the loss became NaN/inf (the last good checkpoint is kept),
2 bad input (nothing written), 130 interrupted by Ctrl-C (a checkpoint was saved; continue with --resume).
"""
from __future__ import annotations

import argparse
import sys

OVERRIDES = True  # unknown --key value arguments arrive as args.overrides (meshprobe.cli.main)


def _epilog() -> str:
    import dataclasses
    import textwrap

    from meshprobe.config import ModelConfig
    from meshprobe.training import TrainConfig, list_presets

    def keys(cls, label):
        names = " ".join(f.name for f in dataclasses.fields(cls))
        return textwrap.fill(names, width=100, initial_indent=f"  {label} keys: ", subsequent_indent=" " * 14)

    return "\n".join([
        "overrides: --KEY VALUE for any [model] or [train] field of the preset, e.g. --variant mesh "
        "--layout 3+6R3+3 --lr 1e-3 --steps 200 --data mix --compile --betas 0.9,0.95 --mesh-slots none",
        keys(ModelConfig, "model"), keys(TrainConfig, "train"),
        "zero values: --save-every 0 = a checkpoint only at step 0, on stop and at the end; --eval-every 0 = "
        "validation only at the end; --eval-batches 0 = no validation; --grad-clip 0 = no clipping. "
        "--batch-size, --seq-len, --steps and --log-every must be at least 1.",
        f"presets: {', '.join(list_presets())}",
        "exit codes: 0 done, 1 loss became NaN/inf (last good checkpoint kept), 2 bad input (nothing written), "
        "130 interrupted (checkpoint saved)",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _epilog()
    parser.add_argument("--config", "-c", metavar="PRESET|FILE",
                        help="preset name (e.g. tiny) or path to a TOML file with [model] and [train] tables; "
                             "with --resume it defaults to the checkpoint's own config")
    parser.add_argument("--out", "-o", required=True, metavar="DIR",
                        help="output checkpoint directory (config.json, model.safetensors, tokenizer.json, "
                             "training state, train_log.jsonl)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (model, optimizer, schedule, RNG, data position, log)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    parser.allow_abbrev = False  # --co must not stand for --config: unknown --key value pairs are overrides


def build_configs(args: argparse.Namespace):
    """(ModelConfig, TrainConfig) from --config/--resume and the overrides."""
    from pathlib import Path

    from meshprobe.checkpoint import read_checkpoint_config, resolve_checkpoint
    from meshprobe.errors import UserError
    from meshprobe.training import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)  # unknown keys fail here, before anything else
    if args.config is None:
        if not args.resume:
            raise UserError("--config is required (a preset such as tiny, or a TOML file) unless --resume is given")
        out = Path(args.out)
        if not resolve_checkpoint(out).exists():  # out, or the complete folder an interrupted save left
            raise UserError(f"cannot resume: {out} does not exist (give --config to start a new run)")
        saved = read_checkpoint_config(out)
        train_d = dict(saved.get("metadata", {}).get("train") or {})
        if not train_d:
            raise UserError(f"cannot resume: {out} has no train config in its metadata")
        train_d.pop("stop_after", None)  # a stop point is for one invocation only
        if "steps" in train_d and "tokens" in train_d and train_d["tokens"] is not None:
            train_d["steps"] = None
        return load_config(base=(saved["model"], train_d), overrides=overrides)
    return load_config(args.config, overrides)


def _check_sizes(model_cfg, train_cfg) -> None:
    """The first memory checks of the run (``training/state``), made here too so that they answer before torch
    loads: the fp32 weights and one rank's token batch against this machine's memory."""
    from meshprobe.checks import check_fits
    from meshprobe.config import check_memory
    from meshprobe.runtime import dist_env

    check_memory(model_cfg, 4, "its fp32 weights")
    per_rank, seq = train_cfg.batch_size // dist_env()[1], train_cfg.seq_len
    check_fits(2 * 8 * per_rank * seq, f"a batch of {per_rank} x {seq} tokens (batch_size)")


def run(args: argparse.Namespace) -> int:
    from meshprobe.errors import UserError
    from meshprobe.runtime import dist_env, dist_env_ok

    from meshprobe.checks import check_out_path

    rank = dist_env()[0] if dist_env_ok() else 0
    try:
        check_out_path(args.out)  # before anything (the library checks it too, naming its parameter out_dir)
        model_cfg, train_cfg = build_configs(args)  # bad flags and configs answer before torch loads
        _check_sizes(model_cfg, train_cfg)
        from meshprobe.training import train

        summary = train(model_cfg, train_cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                        quiet=args.quiet)
    except UserError:
        if rank != 0:
            return 2  # rank 0 prints the message once
        raise
    except Exception as exc:
        from meshprobe.training import TrainingDiverged

        if not isinstance(exc, TrainingDiverged):
            raise
        if rank == 0:
            print(f"meshprobe train: error: {exc}", file=sys.stderr)
        return 1
    if summary["status"] == "interrupted":
        if rank == 0:
            print(f"meshprobe train: interrupted at step {summary['step']}/{summary['total_steps']}; checkpoint "
                  f"saved to {summary['out_dir']} (continue with --resume)", file=sys.stderr)
        return 130
    if summary["status"] == "stopped" and rank == 0 and not args.quiet:
        print(f"meshprobe train: stopped at step {summary['step']}/{summary['total_steps']} (stop_after); "
              f"continue with: meshprobe train --out {summary['out_dir']} --resume", file=sys.stderr)
    return 0

