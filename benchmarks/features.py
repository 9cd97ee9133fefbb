"""Training throughput of the loop crosscoder against a plain SAE of the same width on the same activations.

    python benchmarks/features.py                                   # loop3-mesh: h^(0..3) + 6 slots, F = 512
    python benchmarks/features.py --ckpt checkpoints/loop3-base --features 1024 --k 32

The activations are read once from a bundled checkpoint (its val_tokens.npy, ``--sequences`` rows, the first
position dropped) into one tensor [N, S, d]. Then, alternating in one process (``--repeats`` rounds, median):

* ``crosscoder``: :func:`meshprobe.features.train_crosscoder` on all S sources, ``--steps`` BatchTopK steps;
* ``SAE``: the same function on one source (S = 1: a plain BatchTopK SAE of the same width F, as SAELens would
  train one per hook), on the middle loop state.

Reported: rows per CPU second of each (``time.process_time`` of the run, one thread: on a shared machine the wall
time measures the neighbours; it is in the JSON too), the crosscoder's cost per row relative to one SAE (``ratio``) and to the S SAEs
that would cover every source (``ratio vs S SAEs``; below 1 = the crosscoder is cheaper than one SAE per
hook), and the FVU each reaches. The JSON (``--out``, default benchmarks/results/features.json) holds the
command, the machine and every timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from meshprobe import load_checkpoint
from meshprobe.features import iter_rows, source_spec, train_crosscoder


def activations(ckpt: str, sequences: int) -> tuple[torch.Tensor, list[str]]:
    model = load_checkpoint(ckpt)
    spec = source_spec(model)
    tokens = torch.from_numpy(np.load(Path(ckpt) / "val_tokens.npy")[:sequences].astype(np.int64))
    acts = torch.cat([a for a, _ in iter_rows(model, tokens, spec, batch_size=8)])
    return acts, spec.names


def timed_run(acts: torch.Tensor, args) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, final FVU) of one training run of ``args.steps`` steps."""
    cpu, wall = time.process_time(), time.perf_counter()
    cc = train_crosscoder(acts, args.features, args.k, seed=0, steps=args.steps, batch_size=args.batch)
    return time.process_time() - cpu, time.perf_counter() - wall, cc.meta["training"]["final_fvu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="checkpoints/loop3-mesh")
    ap.add_argument("--sequences", type=int, default=128, help="rows of val_tokens.npy read (default 128)")
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/features.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    acts, names = activations(args.ckpt, args.sequences)
    mid = names.index(f"h^({(len([n for n in names if n.startswith('h^')]) - 1) // 2})")
    single = acts[:, mid:mid + 1].contiguous()
    train_crosscoder(acts[:2 * args.batch], args.features, args.k, steps=2, batch_size=args.batch)  # warm-up
    times = {"crosscoder": [], "SAE": []}
    walls = {"crosscoder": [], "SAE": []}
    fvu = {}
    for r in range(args.repeats):  # alternate, so a busy moment of the machine hits both
        for name, data in ((("crosscoder", acts), ("SAE", single)) if r % 2 == 0 else
                           (("SAE", single), ("crosscoder", acts))):
            seconds, wall, fvu[name] = timed_run(data, args)
            times[name].append(seconds)
            walls[name].append(wall)
    S = acts.shape[1]
    rows = args.steps * args.batch
    rate = {name: rows / statistics.median(t) for name, t in times.items()}
    result = {
        "command": " ".join(["python", *sys.argv]), "ckpt": args.ckpt, "sources": names, "rows": acts.shape[0],
        "d": acts.shape[2], "features": args.features, "k": args.k, "steps": args.steps, "batch": args.batch,
        "rows_per_cpu_s": rate, "ratio": rate["SAE"] / rate["crosscoder"],
        "ratio_vs_S_SAEs": rate["SAE"] / rate["crosscoder"] / S, "fvu": fvu, "cpu_s": times, "wall_s": walls,
        "load_average": os.getloadavg()[0],
        "sae_source": names[mid], "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| model | sources | rows / CPU s | cost per row | final FVU |\n|---|---:|---:|---:|---:|\n"
          f"| SAE ({names[mid]}) | 1 | {rate['SAE']:,.0f} | 1.00x | {fvu['SAE']:.3f} |\n"
          f"| crosscoder | {S} | {rate['crosscoder']:,.0f} | {result['ratio']:.2f}x "
          f"({result['ratio_vs_S_SAEs']:.2f}x of {S} SAEs) | {fvu['crosscoder']:.3f} |")


if __name__ == "__main__":
    main()
