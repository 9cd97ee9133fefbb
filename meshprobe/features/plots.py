"""The crosscoder figures, from features.json dicts (no torch; computing is elsewhere):

* ``profiles``: every live feature's profile (decoder norm per source, divided by its largest), features
  sorted by birth step, then death step, then lifetime class: the heatmap of what each loop step writes;
* ``lifetimes``: the share of each lifetime class per model;
* ``fvu``: the fraction of variance unexplained per source, per model.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_profiles", "plot_lifetimes", "plot_fvu", "profile_order"]

CLASS_COLORS = {"persistent": "tab:red", "transient": "tab:orange", "step-specific": "tab:blue",
                "slot-only": "tab:purple", "other": "tab:gray"}


def profile_order(features: Sequence[dict], sources: Sequence[str]) -> list[int]:
    """Indices of the live features sorted by (birth, death, class, -frequency); no birth (slot-only) last."""
    pos = {n: i for i, n in enumerate(sources)}
    live = [i for i, f in enumerate(features) if f["class"] != "dead"]
    big = len(sources)

    def key(i):
        f = features[i]
        return (pos.get(f["birth"], big), pos.get(f["death"], big), f["class"], -f["frequency"])

    return sorted(live, key=key)


def plot_profiles(result: dict, out_dir: str | os.PathLike, stem: str = "profiles") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshprobe.analysis.plots.diagnostics import save_figure, style

    feats, sources = result["features"], result["sources"]
    order = profile_order(feats, sources)
    mat = np.array([feats[i]["profile"] for i in order], dtype=float).reshape(len(order), len(sources))
    mat = mat / np.maximum(mat.max(axis=1, keepdims=True), 1e-12)
    with style():
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(sources), 4.5))
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
        ax.grid(False)
        ax.set_xticks(range(len(sources)), sources, rotation=60)
        ax.set_ylabel(f"{len(order)} live features (sorted by birth, death)")
        ax.set_title(f"{result['name']}: decoder norm per source / its max", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.08)
        return save_figure(fig, out_dir, stem)


def plot_lifetimes(results: Sequence[dict], out_dir: str | os.PathLike, stem: str = "lifetimes") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshprobe.analysis.plots.diagnostics import save_figure, style

    with style():
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * len(results)))
        names = [r["name"] for r in results]
        left = np.zeros(len(results))
        for cls, color in CLASS_COLORS.items():
            live = [max(1, sum(n for c, n in r["classes"].items() if c != "dead")) for r in results]
            share = np.array([r["classes"].get(cls, 0) / n for r, n in zip(results, live)])
            ax.barh(names, share, left=left, color=color, label=cls)
            left += share
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("share of live features")
        ax.legend(ncol=len(CLASS_COLORS), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        return save_figure(fig, out_dir, stem)


def plot_fvu(results: Sequence[dict], out_dir: str | os.PathLike, stem: str = "fvu") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshprobe.analysis.plots.diagnostics import save_figure, style

    with style():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(dict.fromkeys(n for r in results for n in r["fvu"]))  # every model's sources, in order
        for r in results:
            ax.plot([names.index(n) for n in r["fvu"]], list(r["fvu"].values()), "-o", ms=4, label=r["name"])
        ax.set_xticks(range(len(names)), names, rotation=60)
        ax.set_ylabel("fraction of variance unexplained")
        ax.set_ylim(bottom=0)
        ax.legend()
        return save_figure(fig, out_dir, stem)
