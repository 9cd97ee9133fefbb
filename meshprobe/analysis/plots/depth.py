"""The test-time depth figure (no torch): :func:`meshprobe.analysis.depth.text_depth` and
:func:`~meshprobe.analysis.depth.task_depth` results against the loop count K.

Panels: (a) text: next-token loss of each looped variant run with K loop steps (trained K marked); (b) text:
per-state lens, the loss read straight from h^(t) (final LayerNorm + unembedding, no coda) at the largest K each
variant runs; (c) task: accuracy per hop count p against K (p beyond the trained counts dotted, with the level
of answering the asked-for hop count as a grey line).
"""
from __future__ import annotations

from pathlib import Path

COLORS = {"base": "tab:blue", "residual": "tab:orange", "anchor": "tab:green", "anchor_emb": "tab:olive",
          "mesh": "tab:red", "static_comb": "tab:brown", "dynamic_comb": "tab:pink"}
STYLES = ["-o", "--s", ":^", "-.d"]


def _runs(values: list) -> tuple[list[int], list]:
    idx = [i for i, v in enumerate(values) if v is not None]
    return idx, [values[i] for i in idx]


def plot_depth(text: dict[str, dict], task: dict[str, dict], out_dir: Path, stem: str = "depth") -> list[Path]:
    """Write ``out_dir/stem.png`` and ``.pdf``. text / task: {model name: text_depth / task_depth result}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshprobe.analysis.plots.diagnostics import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for name, r in text.items():
        idx, vals = _runs(r["loss"])
        ax.plot([r["loops"][i] for i in idx], vals, "-o", color=COLORS.get(r["variant"]), label=name, ms=4)
        ax.axvline(r["trained_loops"], color="k", lw=0.6, ls=":")
    ax.set_xlabel("loop steps K at test time (dotted: trained K)")
    ax.set_ylabel("next-token loss (validation sample)")
    ax.set_title("(a) text: loss against K", fontsize=9)
    ax = axes[1]
    for name, r in text.items():
        idx, lens = _runs(r["lens"])
        if idx:
            last = lens[-1]
            ax.plot(range(len(last)), last, "-o", color=COLORS.get(r["variant"]),
                    label=f"{name} (K={r['loops'][idx[-1]]})", ms=4)
    ax.set_xlabel("state h^(t)")
    ax.set_ylabel("lens loss (no coda)")
    ax.set_title("(b) text: per-state lens at the largest K run", fontsize=9)
    ax = axes[2]
    for name, r in task.items():
        trained = {str(p) for p in r["task"]["train_hops"]}
        for j, (p, acc) in enumerate(r["acc"].items()):
            idx, vals = _runs(acc)
            extra = p not in trained
            ax.plot([r["loops"][i] for i in idx], vals, ":" if extra else STYLES[j % len(STYLES)],
                    color=COLORS.get(r["variant"]), ms=4,
                    label=f"{name} p={p}" + (f" (asked {r['asked'][p]}, vs hop_{p})" if extra else ""))
            if extra:
                ax.axhline(r["hop_p_answer"][p], color="0.6", lw=0.8)
    ax.set_xlabel("loop steps K at test time")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("(c) task: accuracy per hop count p (grey: answering the asked hop)", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)
