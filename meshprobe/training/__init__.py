"""Training: the Pythia recipe for vanilla, recursive and MeSH models, with exact resume and multi-GPU (DDP).

    from meshprobe.training import load_config, train
    model_cfg, train_cfg = load_config("tiny", ["--variant", "mesh", "--steps", "200"])
    summary = train(model_cfg, train_cfg, "checkpoints/tiny-mesh")

Modules: :mod:`~meshprobe.training.config` (TrainConfig, schedule), :mod:`~meshprobe.training.overrides` (presets,
TOML and ``--key value`` typing), :mod:`~meshprobe.training.state` (optimizer / RNG / log files),
:mod:`~meshprobe.training.loop` (setup, step, log, save). The light modules load eagerly; the loop (torch) on
first use, so ``meshprobe --help`` stays fast.
"""
from __future__ import annotations

import importlib

from meshprobe.training.config import TrainConfig, lr_at
from meshprobe.training.overrides import (PRESET_DIR, convert_value, list_presets, load_config, model_fields,
                                       parse_overrides, resolve_preset, train_fields)

_LAZY = {
    "train": "meshprobe.training.loop",
    "TrainingDiverged": "meshprobe.training.loop",
    "param_groups": "meshprobe.training.loop",
    "read_log": "meshprobe.training.state",
    "check_out_dir": "meshprobe.training.state",
    "compute_loss": "meshprobe.evaluate",
    "evaluate": "meshprobe.evaluate",
    "evaluate_checkpoint": "meshprobe.evaluate",
}

__all__ = ["TrainConfig", "lr_at", "PRESET_DIR", "convert_value", "list_presets", "load_config", "model_fields",
           "parse_overrides", "resolve_preset", "train_fields", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meshprobe.training' has no attribute {name!r}")
