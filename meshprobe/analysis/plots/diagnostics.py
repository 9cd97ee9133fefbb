"""Figures from an analysis' metrics dict (the ``models[]`` entries of metrics.json); no torch needed.

    plot_model(metrics, "figures/tiny-mesh")                      # one model: fig1 + cka_linear, lens, probes, router
    plot_comparison([m1, m2], ["base", "mesh"], "figures/cmp")   # several: fig3, fig4, fig5, lens

Every figure is written as PNG (150 dpi) and PDF, each to a temporary name first and then renamed, so a
crash never leaves a half-written file; figures are closed after saving. Layouts follow the paper:

* ``fig1`` (one model; paper Fig 1): (a) relative update per block, mean +- std over samples; (b) RBF-CKA
  heatmap between states; (c) top-50 normalized singular values per state, log y, mean +- std bands.
* ``cka_linear``: the linear-CKA heatmap. ``lens``: next-token loss of every state decoded directly and
  through the coda, with the model's loss. ``probes``: the token / retrieval / increment / loop-step probes
  (:mod:`meshprobe.analysis.plots.probes`). ``router`` (MeSH): mean write / read weight per step and
  slot, router entropy per step, slot norms.
* ``fig3`` / ``fig4`` / ``fig5`` (several models; paper Fig 3-5): relative update, RBF CKA and spectra side by
  side. ``lens`` (several models): lens losses per model. ``probes`` / ``loop_step`` (several models with
  probes): :func:`meshprobe.analysis.plots.probes.plot_probe_comparison`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (headless; set before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from meshprobe._io import atomic_path  # noqa: E402

__all__ = ["plot_model", "plot_comparison", "save_figure", "style", "FORMATS"]

FORMATS = ("png", "pdf")
_DPI = 150


def _arr(x) -> np.ndarray:
    """JSON lists (None = missing) -> float array with NaN."""
    if x is None:
        return np.array([], dtype=float)
    return np.array(x, dtype=float)


def style():
    return plt.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
                           "figure.dpi": 100, "savefig.bbox": "tight", "axes.titlesize": 10,
                           "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 7})


def save_figure(fig, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Save ``fig`` as ``out_dir/stem.png`` and ``.pdf`` atomically (temp name + rename); close it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for fmt in FORMATS:
            final = out_dir / f"{stem}.{fmt}"
            with atomic_path(final) as tmp:
                # no creation date in the PDF, so regenerated figures are byte-identical
                fig.savefig(tmp, format=fmt, dpi=_DPI, bbox_inches="tight",
                            metadata={"CreationDate": None} if fmt == "pdf" else None)
            paths.append(final)
    finally:
        plt.close(fig)
    return paths


def _state_colors(n: int):
    return sns.color_palette("viridis", max(n, 1))


def _top(values) -> float:
    """An upper y limit: 10% above the largest finite value (1 when there is none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.max()) * 1.1 if v.size and v.max() > 0 else 1.0


def _short(name: str) -> str:
    return name.replace("layer ", "L")


# ---------------------------------------------------------------------------------------------------------
# panels
# ---------------------------------------------------------------------------------------------------------
def _panel_update(ax, m: dict, title: str | None = "(a) relative update") -> None:
    blocks = m["blocks"]
    mean, std = _arr(m["update"]["mean"]), _arr(m["update"]["std"])
    x = np.arange(len(blocks))
    ax.bar(x, mean, yerr=np.nan_to_num(std), capsize=3, color=sns.color_palette("deep")[0], alpha=0.85)
    ax.set_xticks(x, [_short(b) for b in blocks], rotation=45 if len(blocks) > 6 else 0,
                  ha="right" if len(blocks) > 6 else "center")
    ax.set_ylabel(r"$r(f, h)$")
    ax.set_ylim(0, _top(mean + np.nan_to_num(std)))
    if title:
        ax.set_title(title)


def _panel_heatmap(ax, mat, labels: Sequence[str], title: str | None, vmin=0.0, vmax=1.0, cmap="magma",
                   cbar=True, fmt=".2f") -> None:
    mat = _arr(mat)
    annot = mat.shape[0] <= 8
    sns.heatmap(mat, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, annot=annot, fmt=fmt,
                annot_kws={"size": 6}, cbar=cbar, cbar_kws={"shrink": 0.8},
                xticklabels=[_short(s) for s in labels], yticklabels=[_short(s) for s in labels])
    ax.tick_params(axis="x", rotation=90)
    ax.tick_params(axis="y", rotation=0)
    if title:
        ax.set_title(title)


def _panel_spectra(ax, m: dict, title: str | None = "(c) singular spectra", legend: bool = True) -> None:
    states = m["states"]
    mean, std = _arr(m["spectrum"]["mean"]), _arr(m["spectrum"]["std"])
    colors = _state_colors(len(states))
    tiny = 1e-6
    for i, s in enumerate(states):
        mu, sd = mean[i], np.nan_to_num(std[i])
        ok = np.isfinite(mu)
        x = np.arange(len(mu))[ok]
        ax.plot(x, np.clip(mu[ok], tiny, None), color=colors[i], lw=1.2, label=s)
        ax.fill_between(x, np.clip(mu[ok] - sd[ok], tiny, None), np.clip(mu[ok] + sd[ok], tiny, None),
                        color=colors[i], alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel(r"$\sigma_i / \sigma_0$")
    if legend:
        ax.legend(ncol=1 if len(states) <= 8 else 2, frameon=False)
    if title:
        ax.set_title(title)


def _panel_lens(ax, m: dict, label_prefix: str = "") -> None:
    lens = m["lens"]
    states = lens["states"]
    x = np.arange(len(states))
    mean, std = _arr(lens["loss"]["mean"]), _arr(lens["loss"]["std"])
    ax.errorbar(x, mean, yerr=np.nan_to_num(std), marker="o", ms=3, capsize=2, label=f"{label_prefix}LN + unembed")
    if lens.get("coda_states") and lens.get("coda_loss") and lens["coda_loss"]["mean"] is not None:
        idx = [states.index(s) for s in lens["coda_states"]]
        cm, cs = _arr(lens["coda_loss"]["mean"]), _arr(lens["coda_loss"]["std"])
        ax.errorbar(idx, cm, yerr=np.nan_to_num(cs), marker="s", ms=3, capsize=2,
                    label=f"{label_prefix}through coda")
    ml = lens["model_loss"]["mean"]
    if ml is not None:
        ax.axhline(ml, color="gray", ls="--", lw=1, label=f"{label_prefix}model loss")
    ax.set_xticks(x, [_short(s) for s in states], rotation=45 if len(states) > 6 else 0)
    ax.set_ylabel("next-token loss (nats)")


# ---------------------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------------------
def plot_model(m: dict, out_dir: str | os.PathLike) -> list[Path]:
    """All single-model figures of one ``models[]`` entry into ``out_dir``; returns the files written."""
    out: list[Path] = []
    name = m.get("name", "")
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1.15, 1.1]})
        _panel_update(axes[0], m)
        _panel_heatmap(axes[1], m["cka"]["rbf"]["mean"], m["states"],
                       f"(b) RBF CKA (sigma = {m['cka']['sigma_frac']:g} x median dist.)")
        _panel_spectra(axes[2], m)
        fig.suptitle(f"{name}: diagnostics ({m['data']['n_samples']} samples x {m['data']['seq_len']} tokens)")
        fig.tight_layout()
        out += save_figure(fig, out_dir, "fig1")

        fig, ax = plt.subplots(figsize=(4.6, 4))
        _panel_heatmap(ax, m["cka"]["linear"]["mean"], m["states"], f"{name}: linear CKA")
        out += save_figure(fig, out_dir, "cka_linear")

        fig, ax = plt.subplots(figsize=(5, 3.5))
        _panel_lens(ax, m)
        ax.set_title(f"{name}: lens")
        ax.legend(frameon=False)
        fig.tight_layout()
        out += save_figure(fig, out_dir, "lens")

        if m.get("probes"):
            from meshprobe.analysis.plots.probes import plot_probes

            out += plot_probes(m, out_dir)
        if m.get("router"):
            out += _plot_router(m, out_dir)
    return out


def _plot_router(m: dict, out_dir) -> list[Path]:
    r = m["router"]
    steps, slots = r["steps"], r["slots"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, key, title in ((axes[0], "write", "mean write weight"), (axes[1], "read", "mean read weight")):
        sns.heatmap(_arr(r[key]["mean"]), ax=ax, vmin=0, vmax=1, cmap="rocket_r", annot=True, fmt=".2f",
                    annot_kws={"size": 6}, xticklabels=slots, yticklabels=steps, cbar_kws={"shrink": 0.8})
        ax.set_title(title)
        ax.tick_params(axis="y", rotation=0)
    ax = axes[2]
    x = np.arange(len(steps))
    for off, key, label in ((-0.18, "write_entropy", "write"), (0.18, "read_entropy", "read")):
        ax.bar(x + off, _arr(r[key]["mean"]), yerr=np.nan_to_num(_arr(r[key]["std"])), width=0.36, capsize=2,
               label=label)
    ax.axhline(r["max_entropy"], color="k", ls="--", lw=1, label="uniform (log B)")
    ax.set_xticks(x, steps)
    ax.set_ylabel("entropy per token (nats)")
    ax.set_title("router entropy")
    ax.legend(frameon=False, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax = axes[3]
    sns.heatmap(_arr(r["slot_norm"]["mean"]), ax=ax, cmap="mako", annot=True, fmt=".1f", annot_kws={"size": 6},
                xticklabels=slots, yticklabels=steps, cbar_kws={"shrink": 0.8})
    ax.set_title("slot norm after the write")
    ax.tick_params(axis="y", rotation=0)
    fig.suptitle(f"{m.get('name', '')}: MeSH routers")
    fig.tight_layout()
    return save_figure(fig, out_dir, "router")


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


# ---------------------------------------------------------------------------------------------------------
# several models
# ---------------------------------------------------------------------------------------------------------
def plot_comparison(models: Sequence[dict], names: Sequence[str] | None, out_dir: str | os.PathLike) -> list[Path]:
    """Side-by-side figures (paper Fig 3/4/5 + lens) of several ``models[]`` entries into ``out_dir``."""
    names = list(names) if names is not None else [m.get("name", f"model {i}") for i, m in enumerate(models)]
    if len(names) != len(models):
        raise ValueError(f"{len(models)} models but {len(names)} names")
    n = len(models)
    out: list[Path] = []
    with style():
        # fig3: relative update
        same_blocks = all(m["blocks"] == models[0]["blocks"] for m in models)
        if same_blocks:
            fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(models[0]["blocks"]) * (1 + 0.25 * n)), 3.6))
            blocks = models[0]["blocks"]
            w = 0.8 / n
            x = np.arange(len(blocks))
            for i, (m, nm) in enumerate(zip(models, names)):
                ax.bar(x + (i - (n - 1) / 2) * w, _arr(m["update"]["mean"]), width=w,
                       yerr=np.nan_to_num(_arr(m["update"]["std"])), capsize=2, label=nm)
            ax.set_xticks(x, [_short(b) for b in blocks])
            ax.set_ylabel(r"$r(f, h)$")
            ax.legend(frameon=False)
            ax.set_title("relative update magnitude per block")
        else:
            fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), sharey=True, squeeze=False)
            for ax, m, nm in zip(axes[0], models, names):
                _panel_update(ax, m, title=nm)
            ymax = max(_top(_arr(m["update"]["mean"]) + np.nan_to_num(_arr(m["update"]["std"]))) for m in models)
            axes[0][0].set_ylim(0, ymax)
            fig.suptitle("relative update magnitude per block")
        fig.tight_layout()
        out += save_figure(fig, out_dir, "fig3")

        # fig4: RBF CKA heatmaps
        fig, axes = plt.subplots(1, n, figsize=(3.7 * n + 0.8, 3.7), squeeze=False)
        for i, (ax, m, nm) in enumerate(zip(axes[0], models, names)):
            _panel_heatmap(ax, m["cka"]["rbf"]["mean"], m["states"], nm, cbar=(i == n - 1))
        fig.suptitle("RBF CKA between states")
        fig.tight_layout()
        out += save_figure(fig, out_dir, "fig4")

        # fig5: spectra
        fig, axes = plt.subplots(1, n, figsize=(3.7 * n, 3.4), sharey=True, squeeze=False)
        for ax, m, nm in zip(axes[0], models, names):
            _panel_spectra(ax, m, title=nm)
        fig.suptitle(r"top singular values $\sigma_i / \sigma_0$ per state")
        fig.tight_layout()
        out += save_figure(fig, out_dir, "fig5")

        # lens
        fig, axes = plt.subplots(1, n, figsize=(3.7 * n, 3.4), sharey=True, squeeze=False)
        for ax, m, nm in zip(axes[0], models, names):
            _panel_lens(ax, m)
            ax.set_title(nm)
        axes[0][0].legend(frameon=False)
        fig.suptitle("lens: next-token loss of intermediate states")
        fig.tight_layout()
        out += save_figure(fig, out_dir, "lens")
    from meshprobe.analysis.plots.probes import plot_probe_comparison

    out += plot_probe_comparison(models, names, out_dir)
    return out
