"""The test-time depth part of `meshprobe figures`: the bundled looped models run with K = 1..6 loop steps.

    regenerate_depth("checkpoints", "figures/depth")     # depth.png/.pdf + depth.json

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


def regenerate_depth(checkpoints: str | os.PathLike = "checkpoints", out: str | os.PathLike = "figures/depth",
                     tasks_dir: str | os.PathLike | None = None, loops=(1, 2, 3, 4, 5, 6), samples: int | None = None,
                     n_sequences: int = 512) -> list[Path]:
    """Run every bundled looped model at each K of `loops` and write the depth figure and depth.json to `out`.
    samples: the first N rows of val_tokens.npy (default all); n_sequences: task evaluation sequences per p."""
    import numpy as np

    from meshprobe.analysis.depth import task_depth, text_depth
    from meshprobe.analysis.plots.depth import plot_depth

    root = Path(checkpoints)
    tasks_root = Path(tasks_dir) if tasks_dir is not None else root / "tasks"
    if not (root / "zoo.json").is_file() and not (tasks_root / "zoo.json").is_file():
        raise UserError(f"no bundled zoo in {root} or {tasks_root}: bundle one first (meshprobe zoo --bundle)")
    text, task = {}, {}
    if (root / "zoo.json").is_file():
        tokens = np.load(root / "val_tokens.npy", allow_pickle=False)[:samples]
        text = {name: text_depth(root / name, tokens, loops) for name in _looped(root)}
    if (tasks_root / "zoo.json").is_file():
        task = {name: task_depth(tasks_root / name, loops, n_sequences) for name in _looped(tasks_root)}
    doc = {"format": DEPTH_FORMAT, "version": 1, "loops": list(loops), "text": text, "task": task,
           "text_source": str(root / "val_tokens.npy") if text else None, "text_samples": samples}
    with _io.staging_dir(Path(out)) as tmp:
        plot_depth(text, task, tmp)
        (tmp / "depth.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        Path(out).mkdir(parents=True, exist_ok=True)
        return _io.move_into(tmp, Path(out))
