"""The `meshprobe` command line: thin wiring only.

Each subcommand lives in its own module that exposes `add_arguments(parser)` and `run(args) -> int`.
Those modules import torch / transformer-lens lazily inside `run`, so `meshprobe --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module, one-line help)
COMMANDS = [
    ("train", "meshprobe.train_cli", "train a vanilla, recursive or MeSH model"),
    ("eval", "meshprobe.eval_cli", "validation loss and perplexity of a checkpoint"),
    ("analyze", "meshprobe.analysis.cli", "diagnostics, probes and figures for one or more checkpoints"),
    ("info", "meshprobe.info_cli", "config, parameter counts and hook names of a checkpoint"),
    ("data", "meshprobe.data_cli", "list, pack and inspect training corpora"),
    ("figures", "meshprobe.figures_cli", "regenerate figures/ from the bundled checkpoints"),
    ("zoo", "meshprobe.zoo_cli", "train the checkpoint zoo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshprobe", description="Train, hook and probe recursive (looped) transformers and MeSH models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from meshprobe.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"meshprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshprobe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
