"""`meshprobe data`: list the corpus sources, pack a corpus into one file, show a corpus' split.

    meshprobe data list
    meshprobe data pack --data mix --out mix.txt.xz
    meshprobe data show --data shakespeare my_texts/
    meshprobe data show --data task:phop:hops=2,symbols=8,seq_len=32,mix=1   # a synthetic task: examples, latents
"""
from __future__ import annotations

import argparse
import sys

DATA_HELP = ("corpus: a source name (shakespeare, bible-kjv, fortunes, wordnet, python-doc, linux-doc), 'mix' "
             "(every installed source), or paths (.txt/.txt.gz/.txt.xz files, folders, .jsonl, .parquet, "
             "or a file written by 'meshprobe data pack'); several may be given; or one synthetic task, "
             "task:NAME[:hops=P,symbols=V,seq_len=N,mix=0|1] (NAME phop or modsum; show only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.add_parser("list", help="named corpus sources: installed or not, size, how to install",
                   description="Named corpus sources: installed or not, size, how to install.")
    p = sub.add_parser("pack", help="write a corpus and its train/val split into one compressed text file",
                       description="Write a corpus and its train/val split into one compressed text file "
                                   "(.txt.xz, .txt.gz or .txt) that --data accepts on any machine.")
    p.add_argument("--data", nargs="+", default=["shakespeare"], metavar="SPEC", help=DATA_HELP)
    p.add_argument("--out", required=True, metavar="FILE", help="output file: .txt.xz, .txt.gz or .txt")
    p = sub.add_parser("show", help="documents and bytes per source and split",
                       description="Documents and bytes per source and split of a corpus.")
    p.add_argument("--data", nargs="+", default=["shakespeare"], metavar="SPEC", help=DATA_HELP)
    parser.set_defaults(_data_parser=parser)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]], out=None) -> None:
    out = out or sys.stdout
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def _list(args) -> int:
    from meshprobe import data

    rows = [["source", "present", "size", "license", "install"]]
    total = 0
    for s in data.list_sources():
        total += s["n_bytes"] or 0
        rows.append([s["name"], "yes" if s["available"] else "no", _size(s["n_bytes"]), s["license"].split(" (")[0],
                     "" if s["available"] else s["install"]])
    _table(rows)
    print(f"\nmix = every present source: {_size(total)} of text "
          f"(linux-doc capped at {_size(data.LINUX_DOC_MAX_BYTES)}); "
          f"validation = {data.VAL_FRACTION:.0%} of each source's documents")
    return 0


def _pack(args) -> int:
    from meshprobe import data
    from meshprobe.checks import check_out_path

    check_out_path(args.out, kind="file")  # (pack checks it too, naming its parameter out_path)
    info = data.pack(args.data, args.out)
    print(f"wrote {info['path']}: {_size(info['n_bytes'])} compressed ({info['n_bytes']:,} bytes), "
          f"{_size(info['text_bytes'])} of text, {info['train_docs']} train + {info['val_docs']} val documents")
    return 0


def _show(args) -> int:
    from meshprobe.data import tasks
    from meshprobe import data

    if any(tasks.is_task_spec(d) for d in args.data):
        if len(args.data) != 1:
            from meshprobe.errors import UserError
            raise UserError("a task spec (task:...) cannot be combined with other data")
        print(tasks.describe(tasks.parse_task(args.data[0])))
        return 0

    corpus = data.open_corpus(args.data)
    rows = [["source", "train docs", "val docs", "train size", "val size"]]
    tot = dict(train_docs=0, val_docs=0, train_bytes=0, val_bytes=0)
    for r in corpus.describe():
        for k in tot:
            tot[k] += r[k]
        rows.append([r["source"], str(r["train_docs"]), str(r["val_docs"]), _size(r["train_bytes"]),
                     _size(r["val_bytes"])])
    rows.append(["total", str(tot["train_docs"]), str(tot["val_docs"]), _size(tot["train_bytes"]),
                 _size(tot["val_bytes"])])
    _table(rows)
    print(f"\nfingerprint {corpus.fingerprint[:16]}")
    return 0


def run(args) -> int:
    action = getattr(args, "data_command", None)
    if action == "list":
        return _list(args)
    if action == "pack":
        return _pack(args)
    if action == "show":
        return _show(args)
    args._data_parser.print_help()
    return 2
