"""Figures of the ground-truth task analyses (no torch): one figure per task from the zoo's results rows and
the :func:`meshprobe.analysis.ground_truth.analyze_task` outputs of the bundled models.

Panels: (a) task accuracy at the evaluated hop count by variant, mean +- sd over seeds (dots: seeds) on fresh
sequences, with the copy-x_i shortcut level; (b, c) the t x t' latent map of base and mesh (rows: states, columns:
hop t'); (d) retention of x_i and x_{i-1} through the states; (e) lens accuracy of the answer per state;
(f) patching effect per site (h^(t) and, for mesh, memory slots).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from meshprobe._io import atomic_path

VARIANT_ORDER = ["vanilla", "base", "anchor", "mesh"]
COLORS = {"vanilla": "tab:gray", "base": "tab:blue", "anchor": "tab:green", "mesh": "tab:red"}


FINISHED = ("completed", "solved")


def accuracy_summary(rows: list[dict], key: str = "fresh_task_acc") -> list[dict]:
    """Per variant, over its finished runs (status completed or solved; rows without a status count): n seeds,
    mean and sd of `key`, the seeds' values, how many solved (steps_to_solve set)."""
    rows = [r for r in rows if r.get("status", "completed") in FINISHED]
    out = []
    variants = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in rows)]
    variants += sorted({r["variant"] for r in rows} - set(variants))
    for v in variants:
        vals = [r[key] for r in rows if r["variant"] == v and r.get(key) is not None]
        solves = [r.get("steps_to_solve") for r in rows if r["variant"] == v]
        out.append({"variant": v, "n": len(vals), "mean": statistics.fmean(vals) if vals else float("nan"),
                    "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals,
                    "solved": sum(s is not None for s in solves), "steps_to_solve": solves})
    return out


def _heat(ax, m: dict, title: str) -> None:
    import numpy as np

    acc = np.array(m["accuracy"])
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(m["targets"])), m["targets"])
    ax.set_yticks(range(len(m["states"])), m["states"], fontsize=7)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if acc[i, j] < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    return im


def plot_task(rows: list[dict], analyses: dict[str, dict], path: Path, title: str = "", shortcut: float | None = None):
    """Write `path`.png and .pdf. rows: results rows of the task zoo; analyses: {variant: analyze_task output}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0, 0]
    summ = accuracy_summary(rows)
    for i, s in enumerate(summ):
        ax.bar(i, s["mean"], yerr=s["sd"], color=COLORS.get(s["variant"], "tab:purple"), alpha=0.6, capsize=4)
        ax.scatter([i] * len(s["values"]), s["values"], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(summ)), [f"{s['variant']}\n(n={s['n']}, solved {s['solved']})" for s in summ], fontsize=8)
    if shortcut is not None:
        ax.axhline(shortcut, ls="--", color="k", lw=0.8, label=f"copy x_i shortcut {shortcut:.2f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("task accuracy (fresh sequences)")
    ax.set_title("(a) accuracy by variant, mean ± sd over seeds", fontsize=9)
    for k, v in enumerate(("base", "mesh")):
        ax = axes[0, 1 + k]
        if v in analyses:
            _heat(ax, analyses[v]["latent_map"], f"({'bc'[k]}) {v}: probe accuracy of hop t' per state")
        else:
            ax.set_axis_off()
            ax.set_title(f"({'bc'[k]}) {v}: no bundled model", fontsize=9)
    looped = {v: a for v, a in analyses.items() if v != "vanilla"}  # same states h_emb, h^(0..K), h_out
    ax = axes[1, 0]
    for v, a in looped.items():
        r = a["retention"]
        idx = [i for i, n in enumerate(r["states"]) if not n.startswith("slot")]
        ax.plot(range(len(idx)), [r["accuracy"][i][0] for i in idx], "-o", color=COLORS.get(v), label=v, ms=3)
        ax.plot(range(len(idx)), [r["accuracy"][i][1] for i in idx], "--o", color=COLORS.get(v), ms=3)
        ax.set_xticks(range(len(idx)), [r["states"][i] for i in idx], fontsize=7)
    ax.set_title("(d) retention: x_i (solid), x_{i-1} (dashed), probe accuracy", fontsize=9)
    ax = axes[1, 1]
    for v, a in looped.items():
        names = [n for n in a["lens"] if not n.startswith("slot")]
        ax.plot(range(len(names)), [a["lens"][n] for n in names], "-o", color=COLORS.get(v), label=v, ms=3)
        ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_title("(e) lens accuracy of the answer (model.readout through the coda)", fontsize=9)
    ax = axes[1, 2]
    for v, a in looped.items():
        p = a["patching"]
        eff = dict(zip(p["sites"], p["effect"]))
        hs = [n for n in p["sites"] if not n.startswith("slot")]
        ax.plot(range(len(hs)), [eff[n] for n in hs], "-o", color=COLORS.get(v), label=f"{v}: h^(t)", ms=3)
        ax.set_xticks(range(len(hs)), hs, fontsize=7)
        steps = ["entry"] + [f"loop {t}" for t in range(1, len(hs))]  # the write before h^(t) is read
        for j in sorted({n.split(" @ ")[0] for n in p["sites"] if n.startswith("slot")}):
            ax.plot(range(len(hs)), [eff[f"{j} @ {st}"] for st in steps], ":", color=COLORS.get(v), lw=1, alpha=0.7)
    ax.set_title("(f) patching effect (1 = answer fully corrupted); dotted: one mesh slot", fontsize=9)
    for ax in axes[1]:
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    files = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    for f in files:  # atomically, and no creation date in the PDF: regenerated files are byte-identical
        with atomic_path(f) as tmp:
            fig.savefig(tmp, format=f.suffix[1:], dpi=120, metadata={"CreationDate": None} if f.suffix == ".pdf" else None)
    plt.close(fig)
    return files
