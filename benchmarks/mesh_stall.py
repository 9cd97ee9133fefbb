"""Why +mesh stalls on the task zoo's 2-hop task: the toolkit's task analyses on snapshots along training.

For every run folder given (zoo runs trained with ``keep_every``, snapshots in ``<run>.snapshots/step-N``), on
each kept snapshot (every ``--every`` steps) and the final checkpoint:

* task accuracy per hop count p = 1, 2 on fresh sequences (:func:`meshprobe.evaluate.evaluate_task`, seed 1);
* MeSH routers through the hooks ``{entry,loop.t}.mesh.hook_write_weights / hook_read_weights / hook_memory``: the
  mean write and read weight of every slot at every step, their entropies (uniform = log B), and the RMS of
  every slot right after the step's write (averaged over the symbol positions of p = 2 sequences);
* the ground-truth analyses of :mod:`meshprobe.analysis.ground_truth` (``analyze_task``): the t x t' latent map,
  retention of x_i / x_{i-1}, lens accuracy per state and activation patching per loop state and slot.

And a table of every finished run in the given zoo results files (steps to solve per group and seed), so the
stalled and solved runs and the ablations (``meshprobe zoo --spec zoo-tasks-mesh``) sit side by side.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/mesh_stall.py \\
        --runs runs/zoo-tasks/phop2-mesh-s0 runs/zoo-tasks/phop2-mesh-s1 --every 500 \\
        --results runs/zoo-tasks/results.json runs/zoo-tasks-mesh/results.json \\
        --out benchmarks/results/mesh_stall.json          # + mesh_stall.png beside it
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from meshprobe import _io, load_checkpoint
from meshprobe.analysis.ground_truth import analyze_task
from meshprobe.data import tasks
from meshprobe.evaluate import evaluate_task
from meshprobe.hooks import MESH_HOOKS, mesh_steps
from meshprobe.training.state import snapshot_paths


@torch.no_grad()
def router_summary(model, batch: tasks.TaskBatch) -> dict:
    """Per MeSH step (entry, loop 1..K): mean write / read weight per slot, mean entropy of each, slot RMS after
    the write; averaged over the symbol positions of `batch`."""
    steps = mesh_steps(model.cfg)
    wanted = {f"{p}.{h}" for _, p in steps for h in MESH_HOOKS}
    _, cache = model.run_with_cache(torch.from_numpy(batch.tokens), names_filter=lambda n: n in wanted)
    sl = slice(batch.offset, None)
    out = {"steps": [s for s, _ in steps], "slots": model.cfg.mesh_slots, "write": [], "read": [],
           "write_entropy": [], "read_entropy": [], "slot_rms": [], "max_entropy": math.log(model.cfg.mesh_slots)}
    for _, p in steps:
        for kind in ("write", "read"):
            w = cache[f"{p}.hook_{kind}_weights"][:, sl].double()  # [batch, seq, B]
            out[kind].append(w.mean((0, 1)).tolist())
            out[f"{kind}_entropy"].append(float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean()))
        mem = cache[f"{p}.hook_memory"][:, :, sl].double()  # [batch, B, seq, d]
        out["slot_rms"].append(mem.pow(2).mean((0, 2, 3)).sqrt().tolist())
    return out


def snapshot_row(path: Path, step: int, n_sequences: int, probes: bool) -> dict:
    """Every number of one snapshot (module docstring)."""
    model = load_checkpoint(path)
    spec = tasks.task_from_entry(model.checkpoint_config["metadata"]["task"])
    acc = evaluate_task(model, spec, 512, torch.device("cpu"), chunk=256, seed=1)["task_acc_by_hops"]
    row = {"step": step, "acc_by_hops": acc}
    if model.cfg.variant == "mesh":
        row["router"] = router_summary(model, tasks.eval_set(spec, n_sequences, seed=0))
    if probes:
        gt = analyze_task(model, spec, n_sequences, seed=0)
        row.update({k: gt[k] for k in ("latent_map", "retention", "lens")})
        row["patching"] = {k: gt["patching"][k] for k in ("sites", "effect", "ld_clean", "ld_corrupt")}
    return row


def run_rows(run: Path, every: int, n_sequences: int, probes: bool) -> dict:
    """The snapshots of `run` at multiples of `every` and its final checkpoint, analysed."""
    kept = [(s, p) for s, p in snapshot_paths(run) if s % every == 0]
    final = json.loads((run / "config.json").read_text())["metadata"]
    if not kept or kept[-1][0] != final["step"]:
        kept.append((final["step"], run))
    rows = []
    for step, path in kept:
        print(f"mesh_stall: {run.name} step {step}", file=sys.stderr)
        rows.append(snapshot_row(path, step, n_sequences, probes))
    return {"run": run.name, "status": final.get("status"), "step": final["step"],
            "variant": json.loads((run / "config.json").read_text())["model"]["variant"], "snapshots": rows}


def solve_table(results_files: list[Path]) -> list[dict]:
    """One row per run of the given zoo results files: name, seed, status, steps to solve, fresh accuracy."""
    out = []
    for f in results_files:
        for r in json.loads(f.read_text())["runs"]:
            out.append({"results": str(f), "run": r["run"], "name": r["name"], "seed": r["seed"],
                        "variant": r["variant"], "status": r.get("status"), "step": r.get("step"),
                        "steps_to_solve": r.get("steps_to_solve"), "fresh_task_acc": r.get("fresh_task_acc")})
    return out


def plot(doc: dict, path: Path) -> None:
    """One row of panels per run: accuracy p = 1, 2; read weights per slot at the last loop step; hop_1 / hop_2
    decodability of h^(1..K); patching effect of h^(t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    fig, axes = plt.subplots(len(runs), 4, figsize=(18, 3.3 * len(runs)), squeeze=False)
    for ax_row, r in zip(axes, runs):
        snaps = r["snapshots"]
        steps = [s["step"] for s in snaps]
        ax = ax_row[0]
        for p in snaps[0]["acc_by_hops"]:
            ax.plot(steps, [s["acc_by_hops"][p] for s in snaps], "-o", ms=3, label=f"p={p}")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{r['run']} ({r['status']} at {r['step']}): accuracy", fontsize=9)
        ax = ax_row[1]
        if "router" in snaps[0]:
            B = snaps[0]["router"]["slots"]
            for b in range(B):
                ax.plot(steps, [s["router"]["read"][-1][b] for s in snaps], "-", label=f"read m{b}")
                ax.plot(steps, [s["router"]["write"][-1][b] for s in snaps], ":", color=f"C{b}")
            ax.set_title("last loop step: read (solid) / write (dotted) weight per slot", fontsize=9)
        ax = ax_row[2]
        if "latent_map" in snaps[0]:
            names = snaps[0]["latent_map"]["states"]
            for i, name in enumerate(names):
                if name.startswith("h^(") and name != "h^(0)":
                    ax.plot(steps, [s["latent_map"]["accuracy"][i][1] for s in snaps], "-o", ms=3, label=f"{name} hop_2")
                    ax.plot(steps, [s["latent_map"]["accuracy"][i][0] for s in snaps], ":", ms=3, label=f"{name} hop_1")
            ax.set_ylim(0, 1.02)
            ax.set_title("probe accuracy of hop_1 (dotted) / hop_2 (solid)", fontsize=9)
        ax = ax_row[3]
        if "patching" in snaps[0]:
            sites = [n for n in snaps[0]["patching"]["sites"] if n.startswith("h^(")]
            for n in sites:
                j = snaps[0]["patching"]["sites"].index(n)
                ax.plot(steps, [s["patching"]["effect"][j] for s in snaps], "-o", ms=3, label=n)
            ax.set_title("patching effect of h^(t)", fontsize=9)
        for ax in ax_row:
            ax.set_xlabel("training step")
            ax.legend(fontsize=6)
    fig.tight_layout()
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="zoo run folders with snapshots")
    ap.add_argument("--results", nargs="*", type=Path, default=[], help="zoo results.json files to tabulate")
    ap.add_argument("--every", type=int, default=500, help="analyse the snapshots at multiples of this step")
    ap.add_argument("--sequences", type=int, default=128, help="evaluation sequences of the analyses")
    ap.add_argument("--no-probes", action="store_true", help="only accuracy and routers (fast)")
    ap.add_argument("--out", type=Path, required=True, help="JSON output (the figure goes beside it, .png)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    doc = {"command": "python benchmarks/mesh_stall.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "runs": [run_rows(r, args.every, args.sequences, not args.no_probes) for r in args.runs],
           "solve_table": solve_table(args.results)}
    _io.write_json(args.out, doc, allow_nan=True)
    if doc["runs"]:
        plot(doc, args.out.with_suffix(".png"))
    print(f"mesh_stall: wrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if doc["runs"] else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
