"""Analyses of recursive / MeSH models: `metrics` (paper §2 diagnostics as tensor functions, streaming stats)
and the probes (`probes/`), the pipeline that runs them over a model (`pipeline/`), figures (`plots/`) and
report.md (`report`). Submodules are imported explicitly; nothing heavy is imported here."""


def __getattr__(name):  # lazy public API, so that importing the package does not import torch
    if name == "token_probe":
        from meshprobe.analysis.probes.tokens import token_probe
        return token_probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
