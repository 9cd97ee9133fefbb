"""The files of `meshprobe features`: features.json, report.md (a "Features across loop steps" section per
model), the figures, and each model's crosscoder; :func:`run_features` is the command's library side.

Output folder::

    features.json          {"format": "meshprobe-features", "version": 1, "models": [report dict per model]}
    report.md              the summary per model (classes, FVU, Latent Scaling, causal check, top features)
    lifetimes.png/.pdf     lifetime classes per model          fvu.png/.pdf   FVU per source, per model
    <name>/profiles.png    profiles sorted by birth            <name>/crosscoder/   the dictionary (safetensors + JSON)

Everything is written into a staging folder beside ``out`` and moved in when every model succeeded, one
rename per file, features.json last.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from meshprobe import _io
from meshprobe.errors import UserError
from meshprobe.features.checks import DEFAULT_EXPANSION, DEFAULT_K

__all__ = ["check_inputs", "render_features", "run_features", "write_features"]

FORMAT = "meshprobe-features"


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def mean_profile(r: dict) -> list[float]:
    """Per source, the mean over live features of the profile divided by the feature's largest value."""
    rows = [[v / max(max(f["profile"]), 1e-12) for v in f["profile"]] for f in r["features"] if f["class"] != "dead"]
    return [sum(col) / max(1, len(rows)) for col in zip(*rows)] if rows else [0.0] * len(r["sources"])


def _causal_lines(c: dict) -> list[str]:
    lines = [f"Causal check (ablating the feature's decoder contribution at one state, {len(c['features'])} "
             f"features with the most activation mass; clean loss {c['clean_loss']:.3f}): change in loss / in "
             "the right answer's logit", "",
             "| feature | class | birth | " + " | ".join(c["sources"]) + " |",
             "|---|---|---|" + "---|" * len(c["sources"])]
    for i, f in enumerate(c["features"]):
        cells = [f"{dl:+.4f} / {dg:+.3f}" for dl, dg in zip(c["d_loss"][i], c["d_logit"][i])]
        lines.append(f"| {f} | {c['class'][i]} | {c['birth'][i]} | " + " | ".join(cells) + " |")
    n = max(1, len(c["features"]))
    means = [(sum(row[j] for row in c["d_loss"]) / n, sum(row[j] for row in c["d_logit"]) / n)
             for j in range(len(c["sources"]))]
    lines.append("| mean | | | " + " | ".join(f"{dl:+.4f} / {dg:+.3f}" for dl, dg in means) + " |")
    return lines + [""]


def _top_lines(r: dict, n: int = 6) -> list[str]:
    live = sorted((f for f in r["features"] if f["class"] != "dead"), key=lambda f: -f["frequency"] * f["mean_code"])
    lines = ["Top features by activation mass:", "", "| feature | class | birth..death | freq | top context |",
             "|---|---|---|---|---|"]
    for f in live[:n]:
        ctx = (f["top"][0]["context"] if f["top"] else "").replace("|", "\\|").replace("\n", "\\n")
        lines.append(f"| {f['id']} | {f['class']} | {f['birth']}..{f['death']} | {f['frequency']:.3f} | `{ctx}` |")
    return lines + [""]


def _model_section(r: dict) -> list[str]:
    s, cc = r["summary"], r["crosscoder"]
    lines = [f"### {r['name']} ({r.get('variant')}, {r.get('layout')})", "",
             f"Crosscoder: {cc['n_features']} features, k = {cc['k']} ({cc['method']}"
             + (f", loaded from {cc['loaded_from']}" if cc["loaded_from"] else "") + f"); tokens: {r['tokens']}; "
             f"{r['rows']} rows. Mean L0 {r['l0']:.1f}, dead {r['dead_fraction']:.1%}, FVU {r['fvu_total']:.3f}.", "",
             "| class | features |", "|---|---:|"]
    lines += [f"| {c} | {n} |" for c, n in r["classes"].items()] + [""]
    lines += [f"Shares of live features: persistent {_f(s['persistent_share'])}, step-specific "
              f"{_f(s['step_specific_share'])}, transient {_f(s['transient_share'])}, slot-only "
              f"{_f(s['slot_only_share'])}; profile flatness (min / max over loop states) {_f(s['flatness'])}."]
    if s.get("slot_share") is not None:
        lines.append(f"MeSH slots: {_f(s['slot_share'])} of live features are present in a slot; "
                     f"{_f(s['persistent_in_slots'])} of the persistent ones; decoder mass in the slots "
                     f"{_f(s['slot_mass'])} (long-lived features: {_f(s.get('long_lived_slot_mass'))}).")
    lines += [f"Latent Scaling flags {r['artefact_share']:.1%} of live features (a source where the profile is "
              "~0 but the data still carries the feature).", "",
              "| source | " + " | ".join(r["fvu"]) + " |", "|---|" + "---:|" * len(r["fvu"]),
              "| FVU | " + " | ".join(f"{v:.3f}" for v in r["fvu"].values()) + " |",
              "| mean profile / max | " + " | ".join(f"{v:.3f}" for v in mean_profile(r)) + " |", ""]
    if r.get("hop_features"):
        lines += ["Features that follow the input symbol or one hop's latent (purity >= 0.5: at least half of the "
                  "feature's activation on one value of it), by birth state:", ""]
        lines += [f"- {hop}: " + ", ".join(f"{n} {c}" for n, c in by.items()) for hop, by in r["hop_features"].items()]
        lines.append("")
    if r.get("causal"):
        lines += _causal_lines(r["causal"])
    return lines + _top_lines(r)


def summary_table(results: Sequence[dict]) -> list[str]:
    """One row per model: fit, sparsity and the shares that answer the paper."""
    lines = ["| model | FVU | L0 | dead | persistent | step-specific | transient | slot-only | flatness | in a slot "
             "| slot mass | LS flags |", "|---|" + "---:|" * 11]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['name']} | {r['fvu_total']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.2f} | "
                     f"{_f(s['persistent_share'], 2)} | {_f(s['step_specific_share'], 2)} | "
                     f"{_f(s['transient_share'], 2)} | {_f(s['slot_only_share'], 2)} | {_f(s['flatness'], 2)} | "
                     f"{_f(s['slot_share'], 2)} | {_f(s['slot_mass'], 2)} | {r['artefact_share']:.2f} |")
    return lines + [""]


def render_features(results: Sequence[dict]) -> str:
    """The report.md section of a list of model reports."""
    lines = ["## Features across loop steps", "",
             "One loop crosscoder per model (`meshprobe features`): a sparse dictionary read from every loop "
             "state h^(0..K) (and MeSH's memory slots), one decoder per source. Classes from each feature's "
             "profile (present where its decoder norm is >= 0.2 of its largest); shares of live features; "
             "flatness = mean min / max of the profile over the loop states; LS flags = share flagged by Latent "
             "Scaling.", ""]
    lines += summary_table(results)
    for r in results:
        lines += _model_section(r)
    return "\n".join(lines) + "\n"


def write_features(out: str | os.PathLike, results: Sequence[dict], crosscoders: Sequence, plot: bool = True
                   ) -> list[Path]:
    """Write the output folder (module docstring) through a staging folder; returns the files."""
    import json

    from meshprobe.features.plots import plot_fvu, plot_lifetimes, plot_profiles

    out = Path(out)
    with _io.staging_dir(out) as tmp:
        for r, cc in zip(results, crosscoders):
            if cc is not None:
                cc.save(tmp / r["name"] / "crosscoder")
            if plot:
                plot_profiles(r, tmp / r["name"])
        if plot:
            plot_lifetimes(results, tmp)
            plot_fvu(results, tmp)
        (tmp / "report.md").write_text(render_features(results), encoding="utf-8")
        doc = {"format": FORMAT, "version": 1, "models": list(results)}
        (tmp / "features.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        return _io.move_into(tmp, out, last=("features.json",))  # features.json, the commit point, last


def _names(paths: Sequence[Path], names: str | None) -> list[str]:
    """One folder-safe display name per model: the comma-separated ``names``, else the folder names made
    distinct (as `meshprobe analyze` names them; written here because its module imports torch)."""
    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "model"

    if names is not None:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(paths) or any(not n for n in out) or len({safe(n) for n in out}) != len(out):
            raise UserError(f"names= needs {len(paths)} distinct non-empty comma-separated names, got {names!r}")
        return [safe(n) for n in out]
    out, seen = [], {}
    for p in paths:
        base = safe(p.resolve().name or "model")
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def check_inputs(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, load=None, names=None,
                 n_features: int | None = None, k: int | None = None, emb: bool = False, out_state: bool = False,
                 slots: bool = True, trust_remote_code: bool = False) -> list[str]:
    """Every check of `meshprobe features` that needs no torch, before anything loads or is written: the output
    folder, each model folder's config and sources, the sizes, a saved crosscoder's JSON against the sources.
    Returns the display names."""
    from meshprobe.checks import check_out_path
    from meshprobe.features.checks import check_saved, check_sizes, model_sources

    paths = [Path(m) for m in models]
    if load is not None and len(paths) != 1:
        raise UserError(f"load={load} takes one model, got {len(paths)}")
    if load is None and n_features is not None:
        check_sizes(n_features, k or DEFAULT_K)
    check_out_path(out, inputs=tuple(paths), input_kind="model")
    labels = _names(paths, names)
    for p in paths:
        try:
            found, d = model_sources(p, trust_remote_code=trust_remote_code, emb=emb, out=out_state, slots=slots)
        except UserError as exc:
            raise UserError(str(exc) if str(p) in str(exc) else f"{p}: {exc}") from None
        if load is not None:
            check_saved(load, found, d, f"load={load}")
        elif n_features is None and d is not None:
            check_sizes(DEFAULT_EXPANSION * d, k or DEFAULT_K)
    return labels


def run_features(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, load: str | None = None,
                 names: str | None = None, trust_remote_code: bool = False, plot: bool = True, **options
                 ) -> list[Path]:
    """`meshprobe features`: :func:`check_inputs` first; then each model's crosscoder (trained, or loaded and
    checked against the loaded model) and report; then the files. ``options`` go to
    :func:`~meshprobe.features.run.features`."""
    labels = check_inputs(models, out, load=load, names=names, trust_remote_code=trust_remote_code,
                          **{k: options[k] for k in ("n_features", "k", "emb", "out_state", "slots") if k in options})
    from meshprobe.features.inputs import load_model
    from meshprobe.features.run import features

    results, ccs = [], []
    for p, label in zip(models, labels):
        model = load_model(p, trust_remote_code=trust_remote_code)
        r, cc = features(model, path=p, name=label, load=load, **{k: v for k, v in options.items() if v is not None})
        results.append(r)
        ccs.append(None if load is not None else cc)
        del model
    return write_features(out, results, ccs, plot=plot)
