"""Analyses of recursive / MeSH models: `metrics` (paper §2 diagnostics as tensor functions, streaming stats)
and `probes` (streaming linear probes). Submodules are imported explicitly; nothing heavy is imported here."""
