"""Features across loop steps: a loop crosscoder that shows what each loop step computes, keeps and drops.

    import meshprobe as mp
    cc = mp.features.train_crosscoder(acts, n_features=512, k=16)   # acts [N, S, d] or batches of it
    cc.encode(acts), cc.decode(codes), cc.profile(), cc.decoder     # [N, F], [N, S, d], [F, S], [F, S, d]
    cc.save("out/cc"); cc = mp.features.load_crosscoder("out/cc")
    result = mp.features.features("checkpoints/loop3-mesh")         # sources from a model, train, report

:mod:`~meshprobe.features.crosscoder` (the model, save / load), :mod:`~meshprobe.features.train` (training),
:mod:`~meshprobe.features.sources` (loop states and MeSH slots from a model, the shuffle buffer),
:mod:`~meshprobe.features.lifetimes` (birth, death, lifetime classes, summary shares),
:mod:`~meshprobe.features.stats` (FVU, Latent Scaling, top contexts), :mod:`~meshprobe.features.causal`
(ablating a feature at one loop step), :mod:`~meshprobe.features.run` (one model end to end),
:mod:`~meshprobe.features.plots` (figures, no torch), :mod:`~meshprobe.features.planted` (planted data).
"""
from meshprobe.features.crosscoder import LoopCrosscoder, load_crosscoder
from meshprobe.features.lifetimes import CLASSES, lifetimes, summary
from meshprobe.features.planted import planted_features, recovery
from meshprobe.features.run import features
from meshprobe.features.sources import SourceSpec, iter_rows, model_batches, shuffled, source_spec
from meshprobe.features.stats import FeatureStats
from meshprobe.features.train import train_crosscoder

__all__ = ["CLASSES", "FeatureStats", "LoopCrosscoder", "SourceSpec", "features", "iter_rows", "lifetimes",
           "load_crosscoder", "model_batches", "planted_features", "recovery", "shuffled", "source_spec", "summary",
           "train_crosscoder"]
