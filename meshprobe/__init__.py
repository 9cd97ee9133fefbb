"""meshprobe: train, hook and probe recursive (looped) transformers and MeSH models.

Public API: ModelConfig, build_model, save_checkpoint, load_checkpoint, load_tokenizer, stack_iterations.
Heavy modules (torch, transformer-lens) load on first use, so `meshprobe --help` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "meshprobe.config",
    "UserError": "meshprobe.errors",
    "build_model": "meshprobe.model",
    "MeshprobeModel": "meshprobe.model",
    "save_checkpoint": "meshprobe.checkpoint",
    "load_checkpoint": "meshprobe.checkpoint",
    "load_tokenizer": "meshprobe.data.tokenizer",
    "stack_iterations": "meshprobe.hooks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meshprobe' has no attribute {name!r}")
