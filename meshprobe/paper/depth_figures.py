"""The test-time depth part of `meshprobe figures`: the bundled looped models run with K = 1..6 loop steps.

    regenerate_depth("checkpoints", "figures/depth")     # depth.png/.pdf + depth.json + depth.md (tables)

Inputs: the text zoo (``checkpoints/zoo.json``, its looped models, ``val_tokens.npy``) and, when bundled, the task
zoo (``checkpoints/tasks/zoo.json``). Every looped model of each is run at every K it can
(:func:`meshprobe.analysis.depth.text_depth` / :func:`~meshprobe.analysis.depth.task_depth`; MeSH at most its
trained K); vanilla models have no loop and are left out. ``depth.json`` holds every number behind the figure.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from meshprobe import _io
from meshprobe.errors import UserError

DEPTH_FORMAT = "meshprobe-depth"


def _looped(root: Path) -> list[str]:
    """Names of the bundled models of `root`/zoo.json with a looped layout."""
    from meshprobe.config import parse_layout

    manifest = json.loads((root / "zoo.json").read_text())
    return [m["name"] for m in manifest["models"] if m["variant"] != "vanilla" and parse_layout(m["layout"])[3]]


def _cell(values, i: int, digits: int) -> str:
    return f"{values[i]:.{digits}f}" if i < len(values) and values[i] is not None else "—"


def depth_markdown(doc: dict) -> str:
    """The tables of depth.json as markdown (the docs include this file; nothing is copied by hand)."""
    loops = doc["loops"]
    head = "| model | " + " | ".join(f"K = {k}" for k in loops) + " |"
    rule = "|---|" + "---:|" * len(loops)
    lines = ["<!-- written by `meshprobe figures` (meshprobe/paper/depth_figures.py); do not edit -->", ""]
    if doc["text"]:
        lines += ["Validation loss (nats) of the bundled looped models run with K loop steps "
                  f"(`{doc['text_source']}`; trained K marked *):", "", head, rule]
        for name, r in doc["text"].items():
            cells = [_cell(r["loss"], r["loops"].index(k), 3) if k in r["loops"] else "—" for k in loops]
            cells = [c + ("*" if k == r["trained_loops"] else "") for c, k in zip(cells, loops)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if doc["task"]:
        lines += ["Task accuracy per hop count p of the bundled task models run with K loop steps (p = 3 is asked "
                  "as p = 2 and scored against hop 3; the last column is what answering the asked hop scores):",
                  "", "| model | p | " + " | ".join(f"K = {k}" for k in loops) + " | asked-hop level |",
                  "|---|---:|" + "---:|" * (len(loops) + 1)]
        for name, r in doc["task"].items():
            for p_, acc in r["acc"].items():
                cells = [_cell(acc, r["loops"].index(k), 3) if k in r["loops"] else "—" for k in loops]
                lines.append(f"| {name} | {p_} | " + " | ".join(cells) + f" | {r['hop_p_answer'][p_]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def regenerate_depth(checkpoints: str | os.PathLike = "checkpoints", out: str | os.PathLike = "figures/depth",
                     tasks_dir: str | os.PathLike | None = None, loops=(1, 2, 3, 4, 5, 6), samples: int | None = None,
                     n_sequences: int = 512) -> list[Path]:
    """Run every bundled looped model at each K of `loops` and write the depth figure and depth.json to `out`.
    samples: the first N rows of val_tokens.npy (default all); n_sequences: task evaluation sequences per p."""
    from meshprobe.analysis.depth import task_depth, text_depth
    from meshprobe.analysis.pipeline.tokens import TokenRequest, given_tokens
    from meshprobe.analysis.plots.depth import plot_depth

    root = Path(checkpoints)
    tasks_root = Path(tasks_dir) if tasks_dir is not None else root / "tasks"
    if not (root / "zoo.json").is_file() and not (tasks_root / "zoo.json").is_file():
        raise UserError(f"no bundled zoo in {root} or {tasks_root}: bundle one first (meshprobe zoo --bundle)")
    text, task = {}, {}
    if (root / "zoo.json").is_file():
        tokens, _ = given_tokens(TokenRequest(root / "val_tokens.npy", samples))  # the bundle's shared sample
        tokens = tokens.numpy()
        text = {name: text_depth(root / name, tokens, loops) for name in _looped(root)}
    if (tasks_root / "zoo.json").is_file():
        task = {name: task_depth(tasks_root / name, loops, n_sequences) for name in _looped(tasks_root)}
    doc = {"format": DEPTH_FORMAT, "version": 1, "loops": list(loops), "text": text, "task": task,
           "text_source": str(root / "val_tokens.npy") if text else None, "text_samples": samples}
    with _io.staging_dir(Path(out)) as tmp:
        plot_depth(text, task, tmp)
        (tmp / "depth.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        (tmp / "depth.md").write_text(depth_markdown(doc), encoding="utf-8")
        Path(out).mkdir(parents=True, exist_ok=True)
        return _io.move_into(tmp, Path(out))
