"""Files out: one analysis folder (metrics.json, report.md, figures) written and published atomically, and the
display names of its models. ``meshprobe analyze`` (checkpoints and transformers directories), ``Metrics.save``
and ``meshprobe figures`` all write through :func:`write_outputs`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import meshprobe
from meshprobe import _io
from meshprobe.analysis.pipeline.schema import FORMAT, FORMAT_VERSION
from meshprobe.errors import UserError

__all__ = ["write_outputs", "plot_analysis", "display_names", "safe_name"]


def safe_name(name: str) -> str:
    """A display name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "model"


def display_names(names: str | None, paths: Sequence[Path]) -> list[str]:
    """One display name per checkpoint: the comma-separated `names`, else the folder names (made distinct)."""
    if names is not None:
        out = [n.strip() for n in names.split(",")]
        if len(out) != len(paths) or any(not n for n in out):
            raise UserError(f"names= needs {len(paths)} non-empty comma-separated names, got {names!r}")
        if len({safe_name(n) for n in out}) != len(out):
            raise UserError(f"names= must be distinct (as folder names), got {names!r}")
        return out
    out, seen = [], {}
    for p in paths:
        base = p.resolve().name or "model"
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append(base if k == 0 else f"{base}-{k + 1}")
    return out


def plot_analysis(results: list[dict], names: list[str], out_dir: Path) -> None:
    """The figures of ``meshprobe analyze``: one model's figures, or the comparison plus each model's own
    figures in ``<name>/``."""
    from meshprobe.analysis.plots import diagnostics as plots

    if len(results) == 1:
        plots.plot_model(results[0], out_dir)
        return
    plots.plot_comparison(results, names, out_dir)
    for res, name in zip(results, names):
        plots.plot_model(res, out_dir / safe_name(name))


def write_outputs(out: str | os.PathLike, models: list[dict], plot: Callable[[Path], Any],
                  extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write an analysis folder: ``plot(folder)`` draws the figures (and any other files), then metrics.json
    (``{"format", "version", "meshprobe_version", "models", **extra}``) and report.md. Everything is written
    into a temp folder beside ``out`` and moved in only when complete, so a failure leaves earlier results
    intact. Returns the files written."""
    from meshprobe.analysis import report

    out = Path(out)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "meshprobe_version": meshprobe.__version__,
           "models": models, **(extra or {})}
    with _io.staging_dir(out) as tmp:
        plot(tmp)
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
        report.write_report(doc, tmp / "report.md")
        out.mkdir(parents=True, exist_ok=True)
        return _io.move_into(tmp, out)
