"""meshprobe: train, hook and probe recursive (looped) transformers and MeSH models.

The notebook API, ``import meshprobe as mp``:

    model = mp.load_checkpoint("checkpoints/loop3-mesh")       # or mp.build_model(mp.ModelConfig(...))
    logits, cache = model.run_with_cache(tokens)
    mp.states(cache)                                            # {"h_emb", "h^(0)", ..., "h^(K)", "h_out"}
    mp.stack_iterations(cache, "hook_state_out")                # [K, batch, seq, d]
    m = mp.analyze("checkpoints/loop3-mesh", samples=64)        # a dict of metrics; m.plot("out/")
    mp.metrics.relative_update(f_h, h); mp.probes.token_probe(...)
    mp.features.train_crosscoder(acts, n_features=512, k=16)    # a loop crosscoder: features across loop steps
    mp.dynamics.spectrum(mp.dynamics.loop_map(model, tokens, t), h)   # the loop step's Jacobian spectrum
    model_cfg, train_cfg = mp.load_config("tiny", {"steps": 200}); mp.train(model_cfg, train_cfg, "runs/tiny")

Heavy modules (torch, transformer-lens) load on first use, so ``meshprobe --help`` stays fast. Nothing here
changes process-wide settings (threads, the CPU allocator); the command line does that for itself.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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
    "states": "meshprobe.hooks",
    "decompose_looped": "meshprobe.tl.decompose",
    "load_config": "meshprobe.training",
    "TrainConfig": "meshprobe.training",
    "train": "meshprobe.training.loop",
    "evaluate_checkpoint": "meshprobe.evaluate",
    "analyze": "meshprobe.analysis.pipeline.analyze",
    "analyze_model": "meshprobe.analysis.pipeline.analyze",
    "sample_tokens": "meshprobe.analysis.pipeline.tokens",
    "Metrics": "meshprobe.analysis.pipeline.analyze",
}
_MODULES = {"metrics": "meshprobe.analysis.metrics", "probes": "meshprobe.analysis.probes",
            "features": "meshprobe.features", "dynamics": "meshprobe.dynamics"}
__all__ = sorted([*_EXPORTS, *_MODULES])

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names load lazily below
    from meshprobe import dynamics, features  # noqa: F401
    from meshprobe.analysis import metrics, probes  # noqa: F401
    from meshprobe.analysis.pipeline.analyze import Metrics, analyze, analyze_model  # noqa: F401
    from meshprobe.analysis.pipeline.tokens import sample_tokens  # noqa: F401
    from meshprobe.checkpoint import load_checkpoint, save_checkpoint  # noqa: F401
    from meshprobe.config import ModelConfig  # noqa: F401
    from meshprobe.data.tokenizer import load_tokenizer  # noqa: F401
    from meshprobe.errors import UserError  # noqa: F401
    from meshprobe.evaluate import evaluate_checkpoint  # noqa: F401
    from meshprobe.hooks import stack_iterations, states  # noqa: F401
    from meshprobe.model import MeshprobeModel, build_model  # noqa: F401
    from meshprobe.tl.decompose import decompose_looped  # noqa: F401
    from meshprobe.training import TrainConfig, load_config  # noqa: F401
    from meshprobe.training.loop import train  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'meshprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
