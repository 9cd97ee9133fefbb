"""`meshprobe figures`: regenerate figures/ from the bundled checkpoints and the results file.

Inputs (all in checkpoints/, written by `meshprobe zoo --bundle checkpoints`): `zoo.json` (which models),
one checkpoint directory per model (with its `train_log.jsonl`), `val_tokens.npy` (the validation token
sample every figure is computed on, so figures regenerate identically on any machine) and `results.json`
(the numbers of every zoo run, bundled or not).

Outputs: the paper's Fig 1 (base) and Fig 3/4/5 (base, +residual, +anchor, +mesh), Fig 6 (training curves),
the Table 1 analogue (figure + markdown) and Table 3/4/6 analogues where the zoo ran them, per-model probe,
lens and router figures, `metrics.json` and `report.md` (from `meshprobe analyze`), `tables.md`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from meshprobe import _io
from meshprobe.errors import UserError

# The paper's numbers beside ours (its §5 Tables 1, 3, 4, 6): 410M 3+6R3+3 Pile PPL, the diagnostic family.
PAPER_TABLE1 = {"vanilla": 9.07, "base": 9.65, "residual": 9.69, "anchor": 9.49, "mesh": 9.35}
PAPER_TABLE3 = {3: 9.1231, 4: 9.1003, 5: 9.0944, 6: 9.1088}  # by B, at the paper's K = 2
PAPER_TABLE3_K = 2
PAPER_TABLE4 = {"vanilla": 9.0675, "base": 9.3542, "anchor": 9.1867, "residual+anchor": 9.2541,
                "residual+anchor+anchor_emb": 9.2415, "anchor+anchor_emb": 9.1694, "static_comb": 9.1731,
                "dynamic_comb": 9.1851, "mesh": 9.0944}
PAPER_TABLE6 = {"loop3-vanilla": 7.4406, "unshared-mesh": 7.2559, "loop3-base": 7.6267, "loop3-mesh": 7.3865}  # 1.4B
COMPARISON = ["base", "residual", "anchor", "mesh"]  # the paper's Fig 3-5 line-up


# --------------------------------------------------------------------------------------------------------
# Tables: plain functions on results rows
# --------------------------------------------------------------------------------------------------------
def label(name: str | None, variant: str = "") -> str:
    """A zoo model's display name: its run name without the family prefix ("loop3-vanilla_scaled" ->
    "vanilla_scaled"), so two models of one variant (vanilla with and without scaled embeddings) stay apart;
    the variant when there is no name."""
    if not name:
        return variant
    return name.split("-", 1)[1] if name.startswith("loop") and "-" in name else name


def variant_summary(rows: list[dict], group: str, loss_key: str = "sample_loss") -> list[dict]:
    """Per model of a group (runs of one name over seeds): seeds, loss mean / sd, perplexity of the mean loss,
    and the paired (same seed) difference to base with its standard error. A gap is 'resolved' only when
    |mean| > 2 s.e. The row's "variant" is the model's label (see `label`)."""
    rows = [r for r in rows if r["group"] == group and r.get(loss_key) is not None]
    base = {r["seed"]: r[loss_key] for r in rows if label(r.get("name"), r["variant"]) == "base"}
    out = []
    for variant in dict.fromkeys(label(r.get("name"), r["variant"]) for r in rows):
        runs = [r for r in rows if label(r.get("name"), r["variant"]) == variant]
        losses = [r[loss_key] for r in runs]
        diffs = [r[loss_key] - base[r["seed"]] for r in runs if r["seed"] in base] if variant != "base" else []
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) >= 2 else None
        mean_diff = statistics.fmean(diffs) if diffs else None
        out.append({
            "variant": variant, "layout": runs[0]["layout"], "seeds": len(runs),
            "non_embedding_params": runs[0]["non_embedding_params"],
            "loss_mean": statistics.fmean(losses), "loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            "ppl": math.exp(statistics.fmean(losses)), "paired_diff_vs_base": mean_diff, "paired_se": se,
            "resolved": None if se is None else abs(mean_diff) > 2 * se,
        })
    return out


def table3_markdown(rows: list[dict], note: str) -> str:
    """Table 3 (buffer length B), rows paired with the paper's by scratch slots B - K - 1 (slots beyond h_emb
    and the K + 1 writes), because our K = 3 while the paper's is 2: the paper's B = 5 pairs with our B = 6."""
    runs = [dict(r, scratch=r["mesh_slots"] - loops(r["layout"]) - 1) for r in rows if r.get("sample_loss") is not None
            and r.get("mesh_slots") and (r["group"] == "table3" or (r["group"] == "loop3" and r["variant"] == "mesh"))]
    runs.sort(key=lambda r: r["scratch"])
    paper = {b - PAPER_TABLE3_K - 1: ppl for b, ppl in PAPER_TABLE3.items()}
    text = ablation_markdown(runs, "table3", "scratch", paper, "Table 3 analogue: buffer length B, aligned by "
                             "scratch slots B − K − 1", ("mesh",), note + " Paper: 410M 4+8R2+4 (K = 2, B = 3..6 = "
                             "scratch 0..3); ours K = 3 (B = 4..7 = scratch 0..3; B = 3 has no scratch row there).")
    return text.replace("| scratch | run |", "| scratch slots | run |")


def loops(layout: str) -> int:
    """K of a looped layout ("1+2R3+1" -> 3); 0 for a plain stack."""
    core = next((part for part in layout.split("+") if "R" in part), None)
    return int(core.split("R")[1]) if core else 0


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def table1_markdown(summary: list[dict], tokens: int | None) -> str:
    lines = [f"Validation loss on the shared sample (`checkpoints/val_tokens.npy`), {tokens:,} training tokens per run"
             if tokens else "Validation loss on the shared sample",
             "", "| variant | layout | non-emb params | seeds | loss mean ± sd | PPL | paired Δ vs base ± s.e. | "
             "resolved (>2 s.e.) | paper PPL (410M 3+6R3+3) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        sd = f" ± {s['loss_sd']:.3f}" if s["loss_sd"] is not None else ""
        diff = "—" if s["paired_diff_vs_base"] is None else (
            f"{s['paired_diff_vs_base']:+.3f}" + (f" ± {s['paired_se']:.3f}" if s["paired_se"] is not None else " (1 seed)"))
        resolved = {None: "—", True: "yes", False: "no"}[s["resolved"]]
        lines.append(f"| {s['variant']} | `{s['layout']}` | {s['non_embedding_params']:,} | {s['seeds']} | "
                     f"{s['loss_mean']:.3f}{sd} | {s['ppl']:.1f} | {diff} | {resolved} | "
                     f"{_fmt(PAPER_TABLE1.get(s['variant']), '.2f')} |")
    return "\n".join(lines)


def ablation_markdown(rows: list[dict], group: str, key: str, paper: dict, title: str,
                      include: tuple[str, ...] = (), note: str = "") -> str:
    """One ablation table: the runs of `group` plus the main family's (group "loop3") runs of the variants in
    `include` (e.g. the default-B mesh for Table 3), one row per value of `key`, mean over seeds."""
    runs = [r for r in rows if r.get("sample_loss") is not None and
            (r["group"] == group or (r["group"] == "loop3" and r["variant"] in include))]
    if not any(r["group"] == group for r in runs):
        return f"### {title}\n\nNot in this zoo (the GPU spec `zoo-gpu` has it: `meshprobe zoo --spec zoo-gpu`).\n"
    lines = [f"### {title}", "", note, "", f"| {key} | run | seeds | loss mean | PPL | paper PPL |",
             "|---|---|---|---|---|---|"] if note else [
             f"### {title}", "", f"| {key} | run | seeds | loss mean | PPL | paper PPL |", "|---|---|---|---|---|---|"]
    for value in dict.fromkeys(r[key] for r in runs):
        same = [r for r in runs if r[key] == value]
        losses = [r["sample_loss"] for r in same]
        lines.append(f"| {value} | {same[0]['name']} | {len(losses)} | {statistics.fmean(losses):.3f} | "
                     f"{math.exp(statistics.fmean(losses)):.1f} | {_fmt(paper.get(value), '.4f')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Figures that are not analyses of one model: training curves (Fig 6) and the Table 1 bars
# --------------------------------------------------------------------------------------------------------
def eval_settings_agree(configs: dict[str, dict]) -> bool:
    """True when every run evaluated the same validation windows (same data, tokenizer, batch, seq_len and
    eval_batches: the windows are a pure function of these), so their in-log validation losses compare."""
    keys = ("data", "batch_size", "seq_len", "eval_batches", "tokenizer")
    seen = {json.dumps([c.get("metadata", {}).get("train", {}).get(k) for k in keys]) for c in configs.values()}
    return len(seen) == 1


def plot_training_curves(logs: dict[str, list[dict]], out_dir: Path, final: dict[str, float] | None = None,
                         comparable: bool = True) -> list[Path]:
    """Fig 6 analogue: training loss against tokens seen (log x) and in-log validation loss, one line per model.
    The in-log curves compare across runs only when every run evaluated the same windows (`comparable`); the
    title says which. `final` (model -> loss on the shared validation sample, the Table 1 number) is drawn as a
    star at the last step, so panel (b) always carries the comparable number too."""
    from meshprobe.analysis.plots.diagnostics import plt, save_figure, style

    final = final or {}
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, records in logs.items():
            train = [r for r in records if r.get("type") == "train"]
            val = [r for r in records if r.get("type") == "eval"]
            axes[0].plot([r["tokens"] for r in train], [r["loss"] for r in train], label=name, lw=1.2)
            line, = axes[1].plot([r["tokens"] for r in val], [r["val_loss"] for r in val], marker="o", label=name,
                                 lw=1.2)
            if name in final and train:
                axes[1].plot([train[-1]["tokens"]], [final[name]], marker="*", ms=11, color=line.get_color())
        what = ("in-log: the same windows for every run" if comparable
                else "in-log windows differ between runs: compare the stars")
        axes[0].set(xscale="log", xlabel="tokens seen", ylabel="training loss", title="(a) training loss")
        axes[1].set(xlabel="tokens seen", ylabel="validation loss",
                    title=f"(b) validation loss ({what}; ★ shared sample)")
        axes[0].legend()
        fig.tight_layout()
        return save_figure(fig, out_dir, "fig6_training")


def plot_table1(summary: list[dict], out_dir: Path) -> list[Path]:
    from meshprobe.analysis.plots.diagnostics import plt, save_figure, style

    with style():
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        names = [s["variant"] for s in summary]
        ax.bar(names, [s["loss_mean"] for s in summary], yerr=[s["loss_sd"] or 0 for s in summary], capsize=3,
               color="tab:blue", alpha=0.8)
        lo = min(s["loss_mean"] for s in summary)
        ax.set_ylim(lo - 0.15, max(s["loss_mean"] + (s["loss_sd"] or 0) for s in summary) + 0.05)
        ax.set(ylabel="validation loss (shared sample)", title="Table 1 analogue: loss per variant (± sd over seeds)")
        fig.tight_layout()
        return save_figure(fig, out_dir, "table1")


# --------------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------------
def load_bundle(checkpoints: str | os.PathLike) -> tuple[dict, "object", dict]:
    """(manifest, validation tokens, results) of a bundled zoo; one-line errors for anything missing."""
    import numpy as np

    root = Path(checkpoints)
    manifest_path = root / "zoo.json"
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} not found: bundle a zoo first (meshprobe zoo --bundle {root})")
    manifest = _io.read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), list):
        raise UserError(f"{manifest_path}: not a zoo manifest (a JSON object with a list of models)")
    tokens_path = root / manifest.get("val_tokens", "val_tokens.npy")
    try:
        tokens = np.load(tokens_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{tokens_path}: cannot read the validation token sample ({exc})") from None
    results_path = root / manifest.get("results", "results.json")
    results = _io.read_json(results_path) if results_path.is_file() else {"runs": []}
    return manifest, tokens, results


def tables_markdown(results: dict, root: Path) -> tuple[str, list[dict]]:
    """tables.md (Table 1 analogue and the ablation tables) and the Table 1 summary rows."""
    rows = results.get("runs", [])
    summary = variant_summary(rows, "loop3")
    tables = ["# Tables (regenerated by `meshprobe figures`)", "", f"Source: `{root / 'results.json'}` "
              f"({results.get('description', '')}); command: `{results.get('command', '')}`", ""]
    if summary:
        tables += ["## Table 1 analogue (3-loop family)", "", table1_markdown(summary, rows[0].get("tokens_seen")), ""]
    single = "Single seed per ablation run: compare against the seed spread of Table 1 before reading a gap."
    tables += [
        table3_markdown(rows, single),
        ablation_markdown(rows, "table4", "variant", PAPER_TABLE4, "Table 4 analogue: combinations",
                          ("vanilla", "base", "anchor", "mesh"), single + " Paper: 410M 4+8R2+4."),
        ablation_markdown(rows, "table6", "name", PAPER_TABLE6, "Table 6 analogue: MeSH on an unshared model",
                          ("vanilla", "base", "mesh"), single + " unshared-mesh is `1+2+2+2+1` (vanilla+mesh). Paper column: 1.4B "
                          "(vanilla 24, vanilla+mesh 4+8+8+4, recursive and recursive+mesh 4+8R2+4)."),
        ablation_markdown(rows, "router-init", "name", {}, "Router initialization (not stated in the paper)",
                          ("mesh",), single + " `normal`: std 0.02 like every linear layer; `zeros`: uniform."),
    ]
    return "\n".join(tables), summary


def regenerate(checkpoints: str | os.PathLike = "checkpoints", out: str | os.PathLike = "figures",
               samples: int | None = None, probes: bool = True, progress: bool = True) -> list[Path]:
    """Recompute every analysis on the bundled models and rewrite `out` (files are moved in at the end, so a
    failure leaves the previous figures intact). Returns the files written."""
    from meshprobe._io import read_jsonl
    from meshprobe.analysis.plots import diagnostics as plots
    from meshprobe.analysis.pipeline.analyze import analyze_model
    from meshprobe.analysis.pipeline.outputs import write_outputs
    from meshprobe.analysis.pipeline.tokens import TokenRequest, resolve_tokens
    from meshprobe.checkpoint import load_checkpoint

    root, out = Path(checkpoints), Path(out)
    manifest, tokens, results = load_bundle(root)
    request = TokenRequest(tokens, samples, label=str(root / manifest.get("val_tokens", "val_tokens.npy")))
    names = [m["name"] for m in manifest["models"]]
    variants = {m["name"]: label(m["name"]) for m in manifest["models"]}
    metrics = []
    for name in names:
        model = load_checkpoint(root / name)
        tokens, source = resolve_tokens(model, root / name, request)  # the bundle's shared validation sample
        metrics.append(analyze_model(model, tokens, probes=probes, progress=progress, name=variants[name], threads=1,
                                     checkpoint=str(root / name), source=source))
    for m in metrics:  # wall time differs from run to run; the bundle's files must not
        m["data"]["seconds"] = m["timing"] = None
    by_variant = {m["name"]: m for m in metrics}
    tables, summary = tables_markdown(results, root)

    def draw(tmp: Path) -> None:
        if "base" in by_variant:
            plots.plot_model(by_variant["base"], tmp)  # Fig 1 is the base model's diagnostics
        line_up = [v for v in COMPARISON if v in by_variant]
        if len(line_up) > 1:
            plots.plot_comparison([by_variant[v] for v in line_up], line_up, tmp / "comparison")
        for m in metrics:
            plots.plot_model(m, tmp / m["name"])
        logs = {variants[n]: read_jsonl(root / n / "train_log.jsonl") for n in names}
        configs = {variants[n]: json.loads((root / n / "config.json").read_text()) for n in names}
        final = {label(r.get("name"), r["variant"]): r["sample_loss"] for r in results.get("runs", [])
                 if r.get("seed") == 0 and r.get("sample_loss") is not None}
        plot_training_curves({k: v for k, v in logs.items() if v}, tmp, final=final,
                             comparable=eval_settings_agree(configs))
        if summary:
            plot_table1(summary, tmp)
        (tmp / "tables.md").write_text(tables, encoding="utf-8")

    return write_outputs(out, metrics, draw, extra={"table1": summary})
