"""`meshprobe eval CKPT`: validation loss and perplexity of a checkpoint.

    meshprobe eval checkpoints/tiny
    meshprobe eval checkpoints/tiny --data mix --batches 100 --json

The checkpoint's own tokenizer is used; the corpus, sequence length, batch size and number of batches default
to the ones in its training metadata (so the figure matches the val_loss logged during training). A task
checkpoint (``--data task:...``) reports its loss over defined targets and its task accuracy instead.
"""
from __future__ import annotations

import argparse
import json


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


def run(args: argparse.Namespace) -> int:
    from meshprobe.errors import UserError
    from meshprobe.evaluate import evaluate_checkpoint

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")

    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    result = evaluate_checkpoint(args.checkpoint, data_spec=data, batches=args.batches, batch_size=args.batch_size,
                                 seq_len=args.seq_len, device=args.device, split=args.split)
    if args.json:
        print(json.dumps(result))
    else:
        spec = result["data"] if isinstance(result["data"], str) else " ".join(result["data"])
        acc = f"  task acc {result['task_acc']:.4f}" if "task_acc" in result else ""
        print(f"{result['checkpoint']}: {result['split']} loss {result['loss']:.4f}  ppl {result['ppl']:.2f}{acc}  "
              f"({result['tokens']:,} {'targets' if acc else 'tokens'} of {spec}, seq_len {result['seq_len']})")
    return 0
