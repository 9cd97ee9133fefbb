"""Figures of the probes (the ``probes`` entry of a ``models[]`` metrics dict); no torch needed.

* ``probes`` (one model): the information-overload picture. (a) accuracy of the balanced logistic probe for
  x_{i+k} against k, one line per feature space (states solid, MeSH slots dashed), 95% CIs as error bars,
  chance (1/C) dotted, h_emb in black and the random-init model's state in grey (the baselines);
  (b) R^2 of the retrieval probe against k, same lines; (c) the increment over h_emb (delta CE, nats) with CIs;
  (d) the loop-step probe: accuracy with CI per feature set (state, update, unit-normalized, norm-only),
  chance 1/K and the 95% quantile of the permutation null.
* ``probes`` (several models, e.g. base / +residual / +anchor / +mesh): panels (a) and (c) per model, one
  column each, and the loop-step accuracies side by side (``loop_step``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from meshprobe.analysis.plots.diagnostics import plt, save_figure, sns, style

__all__ = ["plot_probes", "plot_probe_comparison"]

_LOOP_LABELS = {"state": "h(t+1)", "update": "update", "state_unit": "h unit", "update_unit": "upd. unit",
                "state_norm": "||h|| only", "update_norm": "||upd|| only"}


def _offsets(pr: dict) -> list[int]:
    return sorted(pr["config"]["offsets"])


def _key(k: int) -> str:
    return "0" if k == 0 else f"{k:+d}"


def _series(block: dict, offsets: Sequence[int], field: str, ci: str | None):
    """(values, lower errors, upper errors) of ``field`` over the offsets (NaN where missing)."""
    v, lo, hi = [], [], []
    for k in offsets:
        r = block.get(_key(k))
        x = np.nan if r is None or r.get(field) is None else float(r[field])
        c = r.get(ci) if (r is not None and ci) else None
        v.append(x)
        lo.append(x - c[0] if c and c[0] is not None else 0.0)
        hi.append(c[1] - x if c and c[1] is not None else 0.0)
    return np.array(v), np.clip(np.array(lo), 0, None), np.clip(np.array(hi), 0, None)


def _colors(features: Sequence[str]) -> dict:
    states = [f for f in features if not (f[0] == "m" and f[1:].isdigit())]
    slots = [f for f in features if f not in states]
    cs = dict(zip(states, sns.color_palette("viridis", max(len(states), 1))))
    cs.update(zip(slots, sns.color_palette("autumn", max(len(slots), 1))))
    cs["h_emb"] = (0, 0, 0)
    return cs


def _panel_offsets(ax, pr: dict, field: str, ci: str, *, source: str = "token", legend: bool = True) -> None:
    offs = _offsets(pr)
    x = np.arange(len(offs))
    block = pr.get(source) or {}
    colors = _colors(pr["features"])
    n = max(len(block), 1)
    for j, (f, res) in enumerate(block.items()):
        v, lo, hi = _series(res, offs, field, ci)
        slot = f[0] == "m" and f[1:].isdigit()
        dx = (j - (n - 1) / 2) * 0.25 / n
        ax.errorbar(x + dx, v, yerr=[lo, hi], color=colors.get(f), ls="--" if slot else "-", marker="o", ms=2.5,
                    lw=1.8 if f == "h_emb" else 1.0, capsize=1.5, label=f)
    ri = pr.get("random_init") or {}
    if source == "token" and ri.get("token"):
        for f, res in ri["token"].items():
            v, lo, hi = _series(res, offs, field, ci)
            ax.errorbar(x, v, yerr=[lo, hi], color="0.55", ls=":", marker="s", ms=2.5, lw=1.2, capsize=1.5,
                        label=f"random init {f}")
    if field == "accuracy":
        ch = _series(next(iter(block.values())), offs, "chance", None)[0] if block else []
        ax.plot(x, ch, color="k", ls=":", lw=0.8, label="chance 1/C")
    if source == "increment":
        ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, [f"x[i{k:+d}]" if k else "x[i]" for k in offs], fontsize=7)
    if legend:
        ax.legend(frameon=False, fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _panel_loop(ax, loop: dict | None, title: str = "(d) loop-step probe") -> None:
    if not loop:
        ax.text(0.5, 0.5, "no loop (or K < 2)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    kinds = [k for k in _LOOP_LABELS if loop.get(k)]
    x = np.arange(len(kinds))
    acc = np.array([loop[k]["accuracy"] for k in kinds])
    err = np.array([[a - loop[k]["ci"][0], loop[k]["ci"][1] - a] for a, k in zip(acc, kinds)]).T.clip(0)
    pal = sns.color_palette("deep")
    ax.bar(x, acc, yerr=err, capsize=2, color=[pal[0] if "norm" not in k else "0.7" for k in kinds])
    for i, k in enumerate(kinds):
        if loop[k].get("null_q95") is not None:
            ax.hlines(loop[k]["null_q95"], i - 0.4, i + 0.4, colors="tab:red", lw=1,
                      label="permutation null q95" if i == 0 else None)
    ax.axhline(loop[kinds[0]]["chance"], color="k", ls=":", lw=0.8, label="chance 1/K")
    ax.set_xticks(x, [_LOOP_LABELS[k] for k in kinds], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (step t)")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=6, loc="lower right")


def plot_probes(m: dict, out_dir: str | os.PathLike) -> list[Path]:
    """The one-model ``probes`` figure of ``m`` (a ``models[]`` entry with probes)."""
    pr = m["probes"]
    with style():
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), gridspec_kw={"width_ratios": [1.25, 1.25, 1.25, 0.9]})
        _panel_offsets(axes[0], pr, "accuracy", "ci", legend=False)
        axes[0].set(ylabel="accuracy", title="(a) token probe: decode x[i+k] from the state at i", ylim=(0, 1.02))
        _panel_offsets(axes[1], pr, "r2", "r2_ci", legend=False)
        axes[1].set(ylabel=r"$R^2$ onto the embedding", title="(b) retrieval probe")
        _panel_offsets(axes[2], pr, "delta_ce", "delta_ce_ci", source="increment", legend=False)
        axes[2].set(ylabel=r"$\Delta$CE vs h_emb (nats)", title="(c) increment over the current token")
        _panel_loop(axes[3], pr.get("loop_step"))
        h, lab = axes[0].get_legend_handles_labels()
        fig.legend(h, lab, frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        cfg = pr["config"]
        fig.suptitle(f"{m.get('name', '')}: probes (test split, {cfg['n_test_seqs']} sequences; bars: 95% CI "
                     f"over sequences; {cfg['max_classes']} classes max)")
        fig.tight_layout()
        return save_figure(fig, out_dir, "probes")


def plot_probe_comparison(models: Sequence[dict], names: Sequence[str], out_dir: str | os.PathLike) -> list[Path]:
    """``probes`` (accuracy and increment against k, one column per model) and ``loop_step`` (side by side)."""
    pairs = [(m, nm) for m, nm in zip(models, names) if m.get("probes")]
    if not pairs:
        return []
    n = len(pairs)
    out: list[Path] = []
    with style():
        fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1.5, 6.2), squeeze=False, sharey="row")
        for j, (m, nm) in enumerate(pairs):
            _panel_offsets(axes[0][j], m["probes"], "accuracy", "ci", legend=j == n - 1)
            axes[0][j].set(title=nm, ylim=(0, 1.02))
            _panel_offsets(axes[1][j], m["probes"], "delta_ce", "delta_ce_ci", source="increment", legend=False)
        axes[0][0].set_ylabel("token-probe accuracy")
        axes[1][0].set_ylabel(r"$\Delta$CE over h_emb (nats)")
        fig.suptitle("information overload: is x[i+k] decodable from each state and slot? (95% CIs; grey: "
                     "random init; black: h_emb)")
        fig.tight_layout()
        out += save_figure(fig, out_dir, "probes")
        loops = [(m, nm) for m, nm in pairs if m["probes"].get("loop_step")]
        if loops:
            fig, axes = plt.subplots(1, len(loops), figsize=(3.2 * len(loops), 3.2), squeeze=False, sharey=True)
            for ax, (m, nm) in zip(axes[0], loops):
                _panel_loop(ax, m["probes"]["loop_step"], title=nm)
            fig.suptitle("loop-differentiation probe: which loop step t does a vector come from?")
            fig.tight_layout()
            out += save_figure(fig, out_dir, "loop_step")
    return out
