"""Analyses of recursive / MeSH models: `metrics` (paper §2 diagnostics as tensor functions, streaming stats)
and `probes` (streaming linear probes). Submodules are imported explicitly; nothing heavy is imported here."""

from meshprobe.analysis.token_probes import token_probe  # noqa: E402,F401  (public API, issue 9)
