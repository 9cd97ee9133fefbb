"""`meshprobe info PATH`: config, parameter counts and hook names of a checkpoint.

Everything a checkpoint holds for a model is validated: config.json, the weights against it, and
tokenizer.json (it must load and fit the model's vocabulary). A checkpoint whose last save was killed
mid-switch is read from the complete folder that save left beside PATH (a note on stderr says which).

A transformers model directory (config.json with ``model_type`` / ``architectures``) is loaded through
``meshprobe.hf``: its architecture, loop spec, number of loop steps, parameter counts and state hooks
(``--loop-spec``, ``--loops``, ``--trust-remote-code`` as for ``meshprobe analyze``).
"""
from __future__ import annotations

import argparse
import json
import sys

from meshprobe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--loop-spec", metavar="FILE.json", default=None,
                        help="transformers model directory: where the loop steps live (default: built-in spec)")
    parser.add_argument("--loops", type=int, default=None, metavar="K",
                        help="transformers model directory: K loop steps instead of the config's")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="transformers model directory: allow its own modeling code (refused otherwise)")


def _refuse_remote_code(paths, trust: bool) -> None:
    """A directory whose config maps to remote code needs --trust-remote-code (checked before anything loads)."""
    from meshprobe.hf.loader import read_hf_config, remote_code_reason

    for p in paths:
        reason = remote_code_reason(read_hf_config(p))
        if reason and not trust:
            raise UserError(f"{p}: {reason}; it runs only with --trust-remote-code")


def _run_hf(args) -> int:
    from meshprobe.hf.checks import check_hf_dir

    if args.loops is not None and args.loops < 1:
        raise UserError(f"--loops must be at least 1, got {args.loops}")
    # config, weights' headers, loop counts and sizes before torch loads
    check_hf_dir(args.path, spec=args.loop_spec, loops=args.loops, trust_remote_code=args.trust_remote_code)
    from meshprobe.hf import load

    _refuse_remote_code([args.path], args.trust_remote_code)
    model = load(args.path, spec=args.loop_spec, trust_remote_code=args.trust_remote_code, loops=args.loops)
    cfg, spec = model.cfg, model.spec
    counts, state = model.parameter_counts(), model.state_hook_names()
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "loop_spec": spec.to_dict(), "parameters": counts,
                          "hooks": list(model.hook_dict)}, indent=2))
        return 0
    print(f"transformers model {args.path}")
    for key in ("architecture", "n_loops", "n_inner", "d_model", "vocab_size", "n_ctx"):
        print(f"  {key:18s} {getattr(cfg, key)}")
    print("loop spec")
    for key, value in spec.to_dict().items():
        if value not in (None, {}, "") and (spec.inner_module or not key.startswith("inner_")):
            print(f"  {key:18s} {value}")
    print("parameters")
    for key, value in counts.items():
        print(f"  {key:18s} {value:,}")
    print(f"state hooks ({len(state)})")
    for name in state:
        print(f"  {name}")
    return 0


def run(args: argparse.Namespace) -> int:
    from meshprobe.hf.loader import is_hf_dir

    if is_hf_dir(args.path):
        return _run_hf(args)
    from meshprobe._io import real_path
    from meshprobe.checkpoint import load_checkpoint, load_tokenizer

    for flag, value in (("--loop-spec", args.loop_spec), ("--loops", args.loops),
                        ("--trust-remote-code", args.trust_remote_code or None)):
        if value is not None:
            raise UserError(f"{flag} applies to transformers model directories only")

    model = load_checkpoint(args.path)  # validates config, weights and their agreement
    tokenizer = load_tokenizer(model.checkpoint_dir, missing_ok=True)  # UserError when malformed
    if tokenizer is not None and tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise UserError(f"{model.checkpoint_dir / 'tokenizer.json'}: {tokenizer.get_vocab_size()} tokens, more than "
                        f"the model's vocab_size {model.cfg.vocab_size}")
    if model.checkpoint_dir != real_path(args.path):
        print(f"meshprobe info: note: read {model.checkpoint_dir.name} beside {args.path} (its last save was "
              "interrupted; the next save or train run puts it in place)", file=sys.stderr)
    config = model.checkpoint_config
    counts = model.parameter_counts()
    hooks = list(model.hook_dict)
    if args.json:
        print(json.dumps({"config": config["model"], "metadata": config.get("metadata", {}),
                          "parameters": counts, "hooks": hooks}, indent=2))
        return 0
    print(f"checkpoint {args.path}")
    for key, value in config["model"].items():
        print(f"  {key:18s} {value}")
    print("parameters")
    for key, value in counts.items():
        print(f"  {key:18s} {value:,}")
    state = model.state_hook_names()
    print(f"state hooks ({len(state)})")
    for name in state:
        print(f"  {name}")
    layer_hooks = [h for h in hooks if h.startswith("blocks.")]
    per_layer = [h.split(".", 2)[2] for h in layer_hooks if h.startswith("blocks.0.")]
    print(f"layer hooks ({len(layer_hooks)}): blocks.{{u}}.<name> for u = 0..{model.cfg.unrolled_depth - 1}, name in")
    for i in range(0, len(per_layer), 4):
        print("  " + "  ".join(per_layer[i:i + 4]))
    other = [h for h in hooks if not h.startswith("blocks.") and h not in state]
    if other:
        print(f"other hooks ({len(other)}): {', '.join(other)}")
    return 0
