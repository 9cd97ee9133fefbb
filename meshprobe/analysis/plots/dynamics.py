"""The loop-dynamics figures (no torch), from ``models[]`` entries of metrics.json with a ``dynamics`` and / or a
``tuned_lens`` section (:mod:`meshprobe.dynamics.analyze`).

``dynamics.png``: (a) spectral radius rho and top singular value sigma_1 of each step's Jacobian, (b) the same for
the step on directions (each position's state scaled to unit norm), (c) convergence: relative update and
distance to the last state of the directions (log scale), (d) the answer: KL to the trained output per step
(log scale; trained K dotted), (e) exit trade-offs: compute saved against KL lost per rule.
``lens_kl.png``: KL(final || lens) per state for the logit, coda, tuned and shared lenses.
"""
from __future__ import annotations

from pathlib import Path

from meshprobe.analysis.plots.depth import COLORS

MARKERS = {"entropy_diff": "o", "latent_diff": "s", "kl": "^", "minp_kl": "v", "argmax_stable": "D", "cosine": "P",
           "acceleration": "X", "ouro_gate": "*", "oracle": "+"}
LENS_STYLES = {"logit": ":o", "coda": "--s", "tuned": "-^", "shared": "-.d"}


def _color(m: dict, i: int) -> str:
    return COLORS.get(m["model"].get("variant"), f"C{i % 10}")


def _xy(values: list) -> tuple[list[int], list]:
    idx = [i for i, v in enumerate(values) if v is not None and v > 0]
    return [i + 1 for i in idx], [values[i] for i in idx]


def _spectra_panel(ax, models, suffix: str, title: str) -> None:
    for i, m in enumerate(models):
        tr = m["dynamics"]["trajectory"]
        if f"rho{suffix}" not in tr:
            continue
        x, y = _xy(tr[f"rho{suffix}"])
        ax.plot([v - 1 for v in x], y, "-o", color=_color(m, i), ms=3, label=f"{m['name']} rho")
        x, y = _xy(tr[f"sigma1{suffix}"])
        ax.plot([v - 1 for v in x], y, "--", color=_color(m, i), lw=1, label=f"{m['name']} sigma_1")
        ax.axvline(tr["trained_loops"] - 0.5, color=_color(m, i), lw=0.5, ls=":")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("loop step t (Jacobian of h^(t) -> h^(t+1))")
    ax.set_title(title, fontsize=9)


def _exits_panel(ax, models) -> None:
    for i, m in enumerate(models):
        ex = m["dynamics"]["exits"]
        sc = ex.get("all_steps") or ex["trained"]
        for rule, row in sc["rules"].items():
            ax.scatter(row["compute_saved"], max(row["kl_lost"], 1e-6), marker=MARKERS.get(rule, "o"),
                       color=_color(m, i), s=28, label=rule if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("compute saved (1 - mean exit step / horizon)")
    ax.set_ylabel("KL(reference || answer at exit), nats (floor 1e-6)")
    ax.set_title("(e) exit rules over all steps run (+: exit where the answer settles)", fontsize=9)


def plot_dynamics(models: list[dict], out_dir: Path, stem: str = "dynamics") -> list[Path]:
    """Write ``out_dir/stem.png`` and ``.pdf`` for the models with a ``dynamics`` section; [] if none."""
    models = [m for m in models if m.get("dynamics")]
    if not models:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshprobe.analysis.plots.diagnostics import save_figure

    fig, axes = plt.subplots(1, 5, figsize=(26, 4.8))
    _spectra_panel(axes[0], models, "", "(a) Jacobian of the step: rho (solid), sigma_1 (dashed)")
    _spectra_panel(axes[1], models, "_dir", "(b) the step on directions: rho, sigma_1")
    ax = axes[2]
    for i, m in enumerate(models):
        tr = m["dynamics"]["trajectory"]
        x, y = _xy(tr["rel_update_dir"])
        ax.plot(x, y, "-o", color=_color(m, i), ms=3, label=f"{m['name']} update ({tr['label_dir']})")
        x, y = _xy(tr["dist_to_last_dir"])
        ax.plot([v - 1 for v in x], y, ":", color=_color(m, i), label=f"{m['name']} distance to last")
    ax.set_yscale("log")
    ax.set_xlabel("loop step t")
    ax.set_title("(c) directions: ||u(t) - u(t-1)|| / ||u(t)|| (solid), to the last (dotted)", fontsize=9)
    ax = axes[3]
    for i, m in enumerate(models):
        tr = m["dynamics"]["trajectory"]
        x, y = _xy(tr["answer"]["kl_trained"])
        ax.plot(x, y, "-o", color=_color(m, i), ms=3, label=m["name"])
        ax.axvline(tr["trained_loops"], color=_color(m, i), lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("loop steps run")
    ax.set_ylabel("KL(output at trained K || answer), nats")
    ax.set_title("(d) the answer against the trained output", fontsize=9)
    _exits_panel(axes[4], models)
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def plot_lens_kl(models: list[dict], out_dir: Path, stem: str = "lens_kl") -> list[Path]:
    """Write ``out_dir/stem.png`` and ``.pdf`` for the models with a ``tuned_lens`` section; [] if none."""
    models = [m for m in models if m.get("tuned_lens")]
    if not models:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meshprobe.analysis.plots.diagnostics import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, m in enumerate(models):
        tl = m["tuned_lens"]
        for lens, style in LENS_STYLES.items():
            vals = tl["kl"][lens]
            idx = [j for j, v in enumerate(vals) if v is not None and v > 0]
            if idx:
                ax.plot(idx, [vals[j] for j in idx], style, color=_color(m, i), ms=4, label=f"{m['name']} {lens}")
        ax.set_xticks(range(len(tl["states"])), tl["states"])
    ax.set_yscale("log")
    ax.set_ylabel("KL(final output || lens), nats (held-out sequences)")
    ax.set_title("lenses per loop state: logit (dotted), coda (dashed), tuned (solid), shared (dash-dot)",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)
