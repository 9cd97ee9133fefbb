"""Analyses of recursive / MeSH models: `metrics` (paper §2 diagnostics as tensor functions, streaming stats)
and `probes` (streaming linear probes). Submodules are imported explicitly; nothing heavy is imported here."""


def __getattr__(name):  # lazy public API (issue 9), so that importing the package does not import torch
    if name == "token_probe":
        from meshprobe.analysis.token_probes import token_probe
        return token_probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
