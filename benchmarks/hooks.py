"""Forward time with idle hooks vs. run_with_cache of all state-level hooks, as ratios in one process.

    python benchmarks/hooks.py [--device cpu|cuda] [--d-model 256] [--layout 2+2R3+2] [--variant mesh]

Three timings of the same model and batch: a reference forward with every HookPoint call removed (the cost
floor), the normal forward with idle hooks, and run_with_cache of all state-level hooks. Reports
idle / reference (target <= 1.02) and cache / idle (target <= 1.2).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import meshprobe.mesh
import meshprobe.model
import meshprobe.tl.compat
from meshprobe import ModelConfig, build_model

HOOKED_MODULES = (meshprobe.model, meshprobe.mesh, meshprobe.tl.compat)  # every module that calls run_hook


@contextmanager
def hooks_removed():
    """Replace run_hook by the identity: the forward a model without any HookPoint would run."""
    original = meshprobe.tl.compat.run_hook
    for module in HOOKED_MODULES:
        module.run_hook = lambda hook, x: x
    try:
        yield
    finally:
        for module in HOOKED_MODULES:
            module.run_hook = original


def timed(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layout", default="2+2R3+2")
    ap.add_argument("--variant", default="mesh")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig(d_model=args.d_model, n_heads=args.heads, vocab_size=8192, n_ctx=args.seq,
                      layout=args.layout, variant=args.variant)
    model = build_model(cfg).to(device).eval()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    state_hooks = model.state_hook_names()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def plain():
        with torch.no_grad(), autocast:
            model(tokens)

    def cached():
        with torch.no_grad(), autocast:
            model.run_with_cache(tokens, names_filter=state_hooks)

    # Interleave the three measurements so drift (thermal, other load) hits all of them alike.
    ref, idle, cache = [], [], []
    for _ in range(5):
        with hooks_removed():
            ref.append(timed(plain, device, args.repeats))
        idle.append(timed(plain, device, args.repeats))
        cache.append(timed(cached, device, args.repeats))
    ref, idle, cache = (statistics.median(x) for x in (ref, idle, cache))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model d{cfg.d_model} {cfg.layout} {cfg.variant}; batch {args.batch}x{args.seq}; "
          f"{len(model.hook_dict)} hook points, {len(state_hooks)} state hooks cached")
    print("| forward | ms | ratio |")
    print("|---|---|---|")
    print(f"| no hook calls (reference) | {ref * 1e3:.2f} | 1.000 |")
    print(f"| idle hooks | {idle * 1e3:.2f} | {idle / ref:.3f} (target <= 1.02) |")
    print(f"| run_with_cache, all state hooks | {cache * 1e3:.2f} | {cache / idle:.3f} x idle (target <= 1.2) |")


if __name__ == "__main__":
    main()
