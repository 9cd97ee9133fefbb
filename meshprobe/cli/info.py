"""`meshprobe info PATH`: config, parameter counts and hook names of a checkpoint."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from meshprobe.checkpoint import load_checkpoint

    model = load_checkpoint(args.path)  # validates config, weights and their agreement
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
    print(f"layer hooks ({len(layer_hooks)}): blocks.{{u}}.hook_resid_pre / attn.hook_pattern / hook_attn_out / "
          f"hook_mlp_out / hook_resid_post for u = 0..{model.cfg.unrolled_depth - 1}")
    return 0
