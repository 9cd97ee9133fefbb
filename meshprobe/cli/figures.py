"""`meshprobe figures`: regenerate figures/ from the bundled checkpoints (CPU, a few minutes)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", default="checkpoints", help="bundled zoo directory (default: checkpoints)")
    parser.add_argument("--out", default="figures", help="output directory (default: figures)")
    parser.add_argument("--samples", type=int, default=None, help="use only the first N validation samples")
    parser.add_argument("--no-probes", action="store_true", help="skip the linear probes (faster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from meshprobe.errors import UserError

    if args.samples is not None and args.samples < 2:
        raise UserError(f"--samples must be at least 2, got {args.samples}")
    from meshprobe.figures import regenerate

    files = regenerate(args.checkpoints, args.out, samples=args.samples, probes=not args.no_probes,
                       progress=not args.no_progress)
    print(f"meshprobe figures: wrote {len(files)} files to {args.out}")
    return 0
