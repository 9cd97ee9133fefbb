"""`meshprobe eval CKPT`: validation loss and perplexity of a checkpoint.

    meshprobe eval checkpoints/tiny
    meshprobe eval checkpoints/tiny --data mix --batches 100 --json
    meshprobe eval checkpoints/loop3-base --loops 1,2,3,4,5,6     # test-time depth: one result per K

The checkpoint's own tokenizer is used; the corpus, sequence length, batch size and number of batches default
to the ones in its training metadata (so the figure matches the val_loss logged during training). A task
checkpoint (``--data task:...``) reports its loss over defined targets and its task accuracy instead.
``--loops K`` runs a looped model with K loop steps (``load_checkpoint(path, loops=K)``); ``--loops 1,2,...``
evaluates every K in one command (``--json``: a list, one object per K).
"""
from __future__ import annotations

import argparse
import json

from meshprobe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory")
    parser.add_argument("--data", nargs="+", metavar="SPEC", default=None,
                        help="corpus to evaluate on (names, 'mix' or paths); default: the one it was trained on")
    parser.add_argument("--split", choices=["val", "train"], default="val", help="which split (default val)")
    parser.add_argument("--batches", type=int, default=None,
                        help="evaluation batches, at least 1 (default: training's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per batch, at least 1 (default: training's)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence, at least 1 (default: training's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--loops", default=None, metavar="K[,K...]",
                        help="run a looped model with K loop steps (several: one result per K)")


def parse_loops(text: str | None) -> list[int] | None:
    """``--loops "3"`` or ``"1,2,3"`` -> [3] or [1, 2, 3] (None when not given); one line naming the flag."""
    if text is None:
        return None
    try:
        loops = [int(k) for k in text.split(",")]
    except ValueError:
        loops = []
    if not loops or min(loops) < 1:
        raise UserError(f"--loops must be loop counts >= 1 like 3 or 1,2,3, got {text!r}")
    return loops


def run(args: argparse.Namespace) -> int:
    from meshprobe.checkpoint import check_loops, read_checkpoint_config

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")

    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    loops = parse_loops(args.loops)
    read_checkpoint_config(args.checkpoint)  # a bad path or config answers before torch loads
    if loops:
        check_loops(args.checkpoint, loops)  # every K checked before any work
    from meshprobe.evaluate import evaluate_checkpoint

    results = [evaluate_checkpoint(args.checkpoint, data_spec=data, batches=args.batches, batch_size=args.batch_size,
                                   seq_len=args.seq_len, device=args.device, split=args.split, loops=k)
               for k in loops or [None]]
    if args.json:
        print(json.dumps(results if loops and len(loops) > 1 else results[0]))
    for result in [] if args.json else results:
        spec = result["data"] if isinstance(result["data"], str) else " ".join(result["data"])
        acc = f"  task acc {result['task_acc']:.4f}" if "task_acc" in result else ""
        at = f" at K={result['loops']}" if loops else ""
        print(f"{result['checkpoint']}{at}: {result['split']} loss {result['loss']:.4f}  ppl {result['ppl']:.2f}{acc}  "
              f"({result['tokens']:,} {'targets' if acc else 'tokens'} of {spec}, seq_len {result['seq_len']})")
    return 0
