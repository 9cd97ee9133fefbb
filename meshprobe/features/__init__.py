"""Features across loop steps: a loop crosscoder that shows what each loop step computes, keeps and drops.

    import meshprobe as mp
    cc = mp.features.train_crosscoder(acts, n_features=512, k=16)   # acts [N, S, d] or batches of it
    cc.encode(acts), cc.decode(codes), cc.profile(), cc.decoder     # [N, F], [N, S, d], [F, S], [F, S, d]
    cc.save("out/cc"); cc = mp.features.load_crosscoder("out/cc")
    result = mp.features.features("checkpoints/loop3-mesh")         # sources from a model, train, report

:mod:`~meshprobe.features.crosscoder` (the model, save / load), :mod:`~meshprobe.features.train` (training),
:mod:`~meshprobe.features.sources` (loop states and MeSH slots from a model, the shuffle buffer),
:mod:`~meshprobe.features.classes` (birth, death, lifetime classes, summary shares),
:mod:`~meshprobe.features.stats` (FVU, Latent Scaling, top contexts), :mod:`~meshprobe.features.causal`
(ablating a feature at one loop step), :mod:`~meshprobe.features.run` (one model end to end),
:mod:`~meshprobe.features.plots` (figures, no torch), :mod:`~meshprobe.features.planted` (planted data),
:mod:`~meshprobe.features.checks` (the checks before torch loads).
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors see; at run time the names load lazily below (the CLI's checks need no torch)
    from meshprobe.features.crosscoder import LoopCrosscoder, load_crosscoder  # noqa: F401
    from meshprobe.features.classes import CLASSES, lifetimes, summary  # noqa: F401
    from meshprobe.features.planted import planted_features, recovery  # noqa: F401
    from meshprobe.features.run import features  # noqa: F401
    from meshprobe.features.sources import SourceSpec, iter_rows, model_batches, shuffled, source_spec  # noqa: F401
    from meshprobe.features.stats import FeatureStats  # noqa: F401
    from meshprobe.features.train import train_crosscoder  # noqa: F401

_EXPORTS = {
    "LoopCrosscoder": "crosscoder", "load_crosscoder": "crosscoder", "CLASSES": "classes", "lifetimes": "classes",
    "summary": "classes", "planted_features": "planted", "recovery": "planted", "features": "run",
    "SourceSpec": "sources", "iter_rows": "sources", "model_batches": "sources", "shuffled": "sources",
    "source_spec": "sources", "FeatureStats": "stats", "train_crosscoder": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"meshprobe.features.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'meshprobe.features' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
