"""The `meshprobe` command line: thin wiring only.

Each subcommand lives in its own module of this package (``meshprobe.cli.train``, ...) that exposes
``add_arguments(parser)`` and ``run(args) -> int`` and holds argument wiring only: the work is done by the
library functions it calls. Those are imported inside ``run``, so ``meshprobe --help`` imports no torch.
A module that sets ``OVERRIDES = True`` receives unknown ``--key value`` arguments as ``args.overrides``
(``meshprobe train``'s config overrides); every other subcommand rejects them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module, one-line help)
COMMANDS = [
    ("train", "meshprobe.cli.train", "train a vanilla, recursive or MeSH model"),
    ("eval", "meshprobe.cli.eval", "validation loss and perplexity of a checkpoint"),
    ("analyze", "meshprobe.cli.analyze", "diagnostics, probes and figures for one or more checkpoints"),
    ("info", "meshprobe.cli.info", "config, parameter counts and hook names of a checkpoint"),
    ("data", "meshprobe.cli.data", "list, pack and inspect training corpora"),
    ("figures", "meshprobe.cli.figures", "regenerate figures/ from the bundled checkpoints"),
    ("zoo", "meshprobe.cli.zoo", "train the checkpoint zoo"),
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
        p.set_defaults(_run=module.run, _overrides=getattr(module, "OVERRIDES", False))
    return parser


def main(argv: list[str] | None = None) -> int:
    from meshprobe.errors import UserError

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and not getattr(args, "_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.overrides = extras
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
