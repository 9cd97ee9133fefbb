"""What the loop-dynamics analyses cost, against the model's own forward, in one process.

    python benchmarks/dynamics.py [--checkpoint checkpoints/loop3-anchor] [--batch 4] [--seq 64] [--iters 20]
                                  [--out benchmarks/results/dynamics.json]

On the same tokens [batch, seq]: the model's forward (no grad; the reference), one application of a loop step
(loop_map), one Jacobian-vector and one vector-Jacobian product of the linearised step (each ~ a backward of
one step), one spectrum (iters Lanczos + iters Arnoldi iterations), and a whole trajectory (4K steps with
spectra) -- each as seconds and as a multiple of the forward. Medians of --repeats runs (the trajectory once).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args) -> dict:
    import meshprobe as mp
    from meshprobe.dynamics.spectrum import Linearized

    model = mp.load_checkpoint(args.checkpoint)
    tokens = np.load(Path(args.checkpoint) / "val_tokens.npy") if args.tokens is None else np.load(args.tokens)
    x = torch.from_numpy(tokens[: args.batch, : args.seq].astype("int64"))
    step = mp.dynamics.loop_map(model, x, 0)
    h = step.h_t
    v = torch.randn_like(h)
    with torch.no_grad():
        forward = timed(lambda: model(x), args.repeats)
        one_step = timed(lambda: step(h), args.repeats)
        lin = Linearized(step, h)
    linearize = timed(lambda: Linearized(step, h), args.repeats)
    jvp = timed(lambda: lin.jvp(v), args.repeats)
    vjp = timed(lambda: lin.vjp(v), args.repeats)
    spec = timed(lambda: mp.dynamics.spectrum(step, h, k=4, iters=args.iters), max(1, args.repeats // 3), warmup=0)
    start = time.perf_counter()
    traj = mp.dynamics.trajectory(model, x, iters=args.iters)
    trajectory = time.perf_counter() - start
    rows = {"forward": forward, "loop_step": one_step, "linearize": linearize, "jvp": jvp, "vjp": vjp,
            "spectrum": spec, "trajectory": trajectory}
    return {"seconds": rows, "x_forward": {k: v / forward for k, v in rows.items()},
            "trajectory_steps": traj["steps"], "trained_loops": traj["trained_loops"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/loop3-anchor")
    ap.add_argument("--tokens", default=None, help=".npy token rows (default: the checkpoint's val_tokens.npy)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    res = measure(args)
    report = {"command": "python benchmarks/dynamics.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", **res}
    print("| what | seconds | x forward |\n|---|---:|---:|")
    for k, s in res["seconds"].items():
        print(f"| {k} | {s:.4f} | {res['x_forward'][k]:.1f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
