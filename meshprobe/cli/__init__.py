"""The `meshprobe` command line: thin wiring only.

Each subcommand lives in its own module of this package (``meshprobe.cli.train``, ...) that exposes
``add_arguments(parser)`` and ``run(args) -> int`` and holds argument wiring only: the work is done by the
library functions it calls. Those are imported inside ``run``, so ``meshprobe --help`` imports no torch.
A module that sets ``OVERRIDES = True`` receives unknown ``--key value`` arguments as ``args.overrides``
(``meshprobe train``'s config overrides); every other subcommand rejects them.

Library errors name Python parameters (``samples=5 but ...``); :func:`main` prints them with the subcommand's
flag instead (``--samples 5 but ...``), for the parameters that are flags of that subcommand. Process-wide
settings (the CPU allocator) are made here, never by the library.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

# (subcommand, module, one-line help)
COMMANDS = [
    ("train", "meshprobe.cli.train", "train a vanilla, recursive or MeSH model"),
    ("eval", "meshprobe.cli.eval", "validation loss and perplexity of a checkpoint"),
    ("analyze", "meshprobe.cli.analyze", "diagnostics, probes and figures for one or more checkpoints"),
    ("info", "meshprobe.cli.info", "config, parameter counts and hook names of a checkpoint"),
    ("data", "meshprobe.cli.data", "list, pack and inspect training corpora"),
    ("figures", "meshprobe.cli.figures", "regenerate figures/ from the bundled checkpoints"),
    ("features", "meshprobe.cli.features", "a loop crosscoder: the features each loop step computes, keeps and drops"),
    ("zoo", "meshprobe.cli.zoo", "train the checkpoint zoo"),
]


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``meshprobe analyze: error: argument --samples: invalid int value:
    'abc'``, exit 2) instead of the usage block and the error; ``--help`` is unchanged."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="meshprobe", description="Train, hook and probe recursive (looped) transformers and MeSH models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _overrides=getattr(module, "OVERRIDES", False), _parser=p)
    return parser


def as_flags(message: str, parser: argparse.ArgumentParser | None) -> str:
    """``name=value`` of a library error -> ``--name value`` where ``--name`` is a flag of ``parser``."""
    if parser is None:
        return message
    flags: dict[str, str] = {}
    switches: set[str] = set()
    parsers = [parser]
    for p in parsers:  # the subcommand's parser and those of its actions (meshprobe data pack / show)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                parsers += list(a.choices.values())
            elif a.option_strings:  # the long form: --out, not -o
                flags.setdefault(a.dest, max(a.option_strings, key=len))
                if isinstance(a, argparse._StoreTrueAction):
                    switches.add(a.dest)
    message = re.sub(r"(?<![\w-])([a-z][a-z_]*)=True\b", lambda m: flags[m.group(1)] if m.group(1) in switches
                     else m.group(0), message)  # trust_remote_code=True -> --trust-remote-code
    # not inside a spec string (task:phop:hops=2,seq_len=12: a key after "," or ":" is the spec's, not a flag)
    return re.sub(r"(?<![\w\-,:])([a-z][a-z_]*)=", lambda m: f"{flags[m.group(1)]} " if m.group(1) in flags
                  else m.group(0), message)


def main(argv: list[str] | None = None) -> int:
    from meshprobe.errors import UserError
    from meshprobe.runtime import tune_cpu_allocator

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and not getattr(args, "_overrides", False):
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    args.overrides = extras
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    tune_cpu_allocator()  # glibc keeps freed tensor memory: no page faults per training step (CPU runs)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        message = as_flags(str(exc), getattr(args, "_parser", None))
        print(f"meshprobe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshprobe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
