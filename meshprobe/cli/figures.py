"""`meshprobe figures`: regenerate figures/ from the bundled checkpoints (CPU, a few minutes)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", default="checkpoints", help="bundled zoo directory (default: checkpoints)")
    parser.add_argument("--out", default="figures", help="output directory (default: figures)")
    parser.add_argument("--samples", type=int, default=None, help="use only the first N validation samples")
    parser.add_argument("--no-probes", action="store_true", help="skip the linear probes (faster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--tasks", default=None, metavar="DIR",
                        help="bundled task zoo (default: CHECKPOINTS/tasks when it has a zoo.json); its figure, "
                             "ground_truth.json and results.md go to OUT/tasks")
    parser.add_argument("--tasks-only", action="store_true", help="regenerate only the task figures")
    parser.add_argument("--no-depth", action="store_true",
                        help="skip the test-time depth figure (OUT/depth: the looped models run with K = 1..6)")


def run(args: argparse.Namespace) -> int:
    from meshprobe.errors import UserError

    if args.samples is not None and args.samples < 2:
        raise UserError(f"--samples must be at least 2, got {args.samples}")
    from meshprobe.checks import check_out_path

    check_out_path(args.out)
    from pathlib import Path

    from meshprobe.paper.figures import load_bundle, regenerate

    if not args.tasks_only:
        load_bundle(args.checkpoints)  # a missing or damaged bundle answers before torch loads
    from meshprobe.runtime import torch_threads

    # One torch thread: float reductions then run in one order, so the files are byte-identical on any machine.
    with torch_threads(1):
        files = [] if args.tasks_only else regenerate(args.checkpoints, args.out, samples=args.samples,
                                                      probes=not args.no_probes, progress=not args.no_progress)
        tasks_dir = Path(args.tasks or Path(args.checkpoints) / "tasks")
        if args.tasks or args.tasks_only or (tasks_dir / "zoo.json").is_file():
            from meshprobe.paper.task_figures import regenerate_tasks

            files += regenerate_tasks(tasks_dir, Path(args.out) / "tasks", n_sequences=args.samples or 256)
        if not (args.no_depth or args.tasks_only):
            from meshprobe.paper.depth_figures import regenerate_depth

            files += regenerate_depth(args.checkpoints, Path(args.out) / "depth", tasks_dir=tasks_dir,
                                      samples=args.samples, n_sequences=args.samples or 512)
    print(f"meshprobe figures: wrote {len(files)} files to {args.out}")
    return 0
