"""`meshprobe zoo`: train the checkpoint zoo from a spec, collect results, bundle into checkpoints/."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default="zoo-cpu", help="zoo spec: a name in meshprobe/configs/zoo (zoo-cpu, zoo-gpu) "
                                                          "or a TOML path (default: zoo-cpu)")
    parser.add_argument("--out", default="runs/zoo", help="directory for the training runs (default: runs/zoo)")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="train only these runs (name or name-sSEED)")
    parser.add_argument("--bundle", metavar="DIR", help="after training, copy the bundle runs into DIR (e.g. checkpoints)")
    parser.add_argument("--no-train", action="store_true", help="skip training; only collect results / bundle")
    parser.add_argument("--list", action="store_true", help="list the spec's runs and exit")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from meshprobe.paper import zoo

    spec = zoo.load_zoo(args.spec)
    if args.list:
        for r in spec.runs:
            print(f"{r.run_id:28s} {r.group:10s} {r.overrides}")
        return 0
    out = Path(args.out)
    rows = zoo.collect_results(spec, out) if args.no_train else zoo.train_zoo(spec, out, args.only)
    print(f"{len(rows)} finished runs; results in {out / zoo.RESULTS_FILE}")
    if args.bundle:
        print(f"bundled into {zoo.bundle(spec, out, args.bundle)}")
    return 0
