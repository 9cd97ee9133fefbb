"""`meshprobe features CKPT|DIR [...] --out DIR`: a loop crosscoder per model -> features.json, report.md, figures.

    meshprobe features checkpoints/loop3-base checkpoints/loop3-mesh --out runs/features
    meshprobe features checkpoints/loop3-mesh --out runs/features-again --load runs/features/loop3-mesh/crosscoder
    meshprobe features path/to/dory --out runs/dory-features          # a transformers looped directory

Sources: the loop states h^(0..K) (``--emb`` adds h_emb, ``--out-state`` h_out) and, for MeSH, the memory slots
after the last write (``--no-slots`` leaves them out). Each model's crosscoder (``--features`` features,
BatchTopK with ``--k`` active per row) is trained on ``--epochs`` streamed passes of the model over its tokens
(the checkpoint's own val_tokens.npy, ``--tokens FILE.npy``, a transformers directory's tokenizer on
``--data``; task checkpoints: ``--samples`` fresh sequences of their task), or loaded with ``--load`` and
checked against the model. Output: ``features.json`` (every feature: profile, birth, death, lifetime class,
Latent Scaling, top contexts; per model: FVU per source, dead fraction, summary shares, the causal check),
``report.md``, ``lifetimes.png``, ``fvu.png``, and per model ``NAME/profiles.png`` and ``NAME/crosscoder/``.
Everything is written through a staging folder beside DIR under the lock ``.DIR.lock``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from meshprobe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="CKPT|DIR",
                        help="meshprobe checkpoints or transformers looped model directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--load", default=None, metavar="CROSSCODER",
                        help="a saved crosscoder folder (NAME/crosscoder of an earlier run) instead of training")
    parser.add_argument("--features", dest="n_features", type=int, default=None,
                        help="dictionary size (default 4 x d_model)")
    parser.add_argument("--k", type=int, default=None, help="mean active features per row (BatchTopK; default 16)")
    parser.add_argument("--epochs", type=int, default=8, help="streamed passes over the tokens (default 8)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per training step (default 1024)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    parser.add_argument("--samples", type=int, default=None,
                        help="sequences (default: every row of the token file; task checkpoints: 2000)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the file's)")
    parser.add_argument("--tokens", metavar="FILE.npy", default=None, help="pre-tokenized sequences [N, seq]")
    parser.add_argument("--data", nargs="+", metavar="SPEC", default=None,
                        help="corpus spec to draw windows from instead of the model's own")
    parser.add_argument("--emb", action="store_true", help="add h_emb as a source")
    parser.add_argument("--out-state", action="store_true", help="add h_out as a source")
    parser.add_argument("--no-slots", action="store_true", help="leave out MeSH's memory slots")
    parser.add_argument("--causal", type=int, default=8, help="features ablated in the causal check (default 8)")
    parser.add_argument("--names", default=None, help="comma-separated display names")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model directory's own modeling code (refused without this flag)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _validate(args) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--causal", args.causal, 0), ("--seed", args.seed, 0), ("--threads", args.threads, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.samples is not None and args.samples < 2:
        raise UserError(f"--samples must be at least 2, got {args.samples}")
    if args.seq_len is not None and args.seq_len < 4:
        raise UserError(f"--seq-len must be at least 4, got {args.seq_len}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.tokens and args.data:
        raise UserError("give --tokens or --data, not both")
    if args.load is not None and (args.n_features is not None or args.k is not None):
        raise UserError("--load takes the crosscoder as saved: drop --features / --k")


def run(args: argparse.Namespace) -> int:
    from meshprobe import _io
    from meshprobe.features.report import check_inputs, run_features
    from meshprobe.runtime import torch_threads

    _validate(args)
    options = dict(n_features=args.n_features, k=args.k, emb=args.emb, out_state=args.out_state,
                   slots=not args.no_slots)
    check_inputs(args.models, args.out, load=args.load, names=args.names, trust_remote_code=args.trust_remote_code,
                 **options)  # before torch loads
    real = _io.real_path(Path(args.out))
    with _io.created_parents(real), _io.out_lock(real, "features"), torch_threads(args.threads or None):
        for kind, _, _, folder in _io.leftovers(real):  # staging folders of killed runs (we hold the lock)
            if kind == "tmp":
                _io.remove_dir(folder)
        moved = run_features(
            args.models, real, load=args.load, names=args.names, trust_remote_code=args.trust_remote_code,
            tokens=args.tokens, samples=args.samples, seq_len=args.seq_len, data=args.data, seed=args.seed,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, causal=args.causal,
            progress=not args.quiet, **options)
    print(f"meshprobe features: wrote {len(moved)} files to {args.out} (features.json, report.md, figures)")
    return 0
