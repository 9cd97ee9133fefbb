"""`meshprobe analyze` on transformers model directories (looped LMs wrapped by :mod:`meshprobe.hf`).

The same pass as for meshprobe's own checkpoints (:func:`~meshprobe.analysis.pipeline.analyze.analyze_model`, the same
metrics.json keys and figures); what differs is how a model and its tokens are found: the model loads with
:func:`meshprobe.hf.loader.load` (built-in or user loop spec, remote code only when trusted, ``loops`` = test-time
depth), and tokens come from ``tokens`` (a .npy file) or from the validation split of ``data`` (default
shakespeare) encoded with the directory's own tokenizer. Analyses that need meshprobe's internals (MeSH
routers, the coda lens) are skipped and metrics.json's ``notes`` say so.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from meshprobe.analysis.pipeline.analyze import (DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, _rows, check_token_shapes,
                                                 load_token_file)
from meshprobe.analysis.pipeline.checkpoints import analyze_and_write, display_names
from meshprobe.analysis.probes.tokens import DEFAULT_OFFSETS
from meshprobe.errors import UserError
from meshprobe.hf.hooked import CTX_FIELDS
from meshprobe.runtime import resolve_device

__all__ = ["analyze_hf_dirs", "dir_tokens", "hf_sample_tokens"]

CHUNK_CHARS = 100_000  # one tokenizer call per chunk (one huge string was measured to stall fast tokenizers)


def _chunks(text: str, size: int = CHUNK_CHARS):
    while len(text) > size:
        cut = text.rfind("\n", 0, size)
        cut = cut + 1 if cut > 0 else size
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def hf_sample_tokens(tokenizer, samples: int, seq_len: int, seed: int = 0, data=None, vocab_size: int | None = None
                     ) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from the validation split of ``data`` (a corpus spec, default
    shakespeare) encoded with a transformers ``tokenizer`` (documents joined by its EOS id when it has one);
    disjoint windows when the split is long enough (encoding stops at twice what they need)."""
    from meshprobe.analysis.stats import sample_disjoint_windows
    from meshprobe.data import open_corpus, sample_sequences

    corpus = open_corpus(data or "shakespeare", quiet=True)
    need, ids = 2 * samples * seq_len, []
    eos = getattr(tokenizer, "eos_token_id", None)
    for doc in corpus.documents("val"):
        for piece in _chunks(doc):
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    if len(ids) < seq_len:
        raise UserError(f"data {corpus.name}: only {len(ids)} val tokens, need at least seq_len = {seq_len}")
    arr = np.asarray(ids, dtype=np.int64)
    if vocab_size is not None and arr.max() >= vocab_size:
        raise UserError(f"the tokenizer gives id {int(arr.max())}, the model has only {vocab_size} token ids")
    if samples * seq_len <= len(arr):
        return torch.from_numpy(sample_disjoint_windows(arr, samples, seq_len, seed))
    return torch.from_numpy(sample_sequences(arr, samples, seq_len, seed))


def _check(paths: list[Path], trust_remote_code: bool, spec, token_file, tokens_path, samples, seq_len):
    """Every input validated before any model loads."""
    from meshprobe.hf import as_spec, read_hf_config
    from meshprobe.hf.loader import remote_code_reason, tokenizer_remote_reason

    configs = [read_hf_config(p) for p in paths]
    for p, config in zip(paths, configs):
        reason = remote_code_reason(config) or (tokenizer_remote_reason(p) if token_file is None else None)
        if reason and not trust_remote_code:
            raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
    if spec is not None:
        as_spec(spec)
    n_ctx = [next((c[k] for k in CTX_FIELDS if isinstance(c.get(k), int)), 1 << 40) for c in configs]
    check_token_shapes([{"model": {"n_ctx": n}} for n in n_ctx], paths, token_file, tokens_path, samples, seq_len)


def dir_tokens(model, path: Path | None, *, token_file=None, tokens_path=None, samples: int | None = None,
               seq_len: int | None = None, seed: int = 0, data=None) -> tuple[torch.Tensor, str]:
    """``(tokens [N, seq], where they came from)`` for a wrapped transformers model: the rows of ``token_file``,
    else ``samples`` windows (default 500) of ``seq_len`` tokens (default min(256, context)) from the validation
    split of ``data`` (default shakespeare) through the tokenizer in ``path`` (its model directory)."""
    if token_file is not None:
        rows = _rows(token_file, samples, seq_len)
        return rows, f"{tokens_path} (rows 0..{rows.shape[0] - 1}, {rows.shape[1]} tokens)"
    from meshprobe.hf.loader import load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code=model.trust_remote_code) if path is not None else None
    if tokenizer is None:
        raise UserError(f"{path or 'the model'} has no tokenizer: pass pre-tokenized sequences (tokens)")
    samples = samples if samples is not None else DEFAULT_SAMPLES
    seq_len = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, model.cfg.n_ctx)
    tokens = hf_sample_tokens(tokenizer, samples, seq_len, seed, data, vocab_size=model.cfg.vocab_size)
    spec = data or "shakespeare"
    return tokens, f"validation split of {spec if isinstance(spec, str) else ' + '.join(spec)} (the model's tokenizer)"


def analyze_hf_dirs(dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, spec=None,
                    trust_remote_code: bool = False, loops: int | None = None, names: str | None = None,
                    samples: int | None = None, seq_len: int | None = None, data=None,
                    tokens: str | os.PathLike | None = None, seed: int = 0, device: str = "auto", batch_size: int = 8,
                    threads: int | None = None, lens_positions: int | None = 64, probes: bool = True,
                    baseline: bool = True, offsets: Sequence[int] | None = None, max_classes: int = 64,
                    l2_mode: str = "per_offset", progress: bool = True,
                    on_result: Callable[[dict], None] | None = None) -> list[Path]:
    """Analyse transformers model directories and write ``out`` like
    :func:`~meshprobe.analysis.pipeline.checkpoints.analyze_checkpoints` (metrics.json, report.md, figures).
    ``spec``: a loop spec for every directory (default: the built-in one of each architecture); ``loops``: run
    every model with this many loop steps. ``offsets``: None = DEFAULT_OFFSETS. Every input is checked before
    any model loads. Returns the files."""
    from meshprobe.hf import load

    paths = [Path(p) for p in dirs]
    token_file = load_token_file(tokens) if tokens else None
    _check(paths, trust_remote_code, spec, token_file, tokens, samples, seq_len)
    labels = display_names(names, paths)
    dev = resolve_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a folder")
    return analyze_and_write(
        [(p, name, None) for p, name in zip(paths, labels)], out, labels,
        lambda p, _: load(p, spec=spec, trust_remote_code=trust_remote_code, device=dev, loops=loops),
        lambda model, p: dir_tokens(model, p, token_file=token_file, tokens_path=tokens, samples=samples,
                                    seq_len=seq_len, seed=seed, data=data),
        on_result, batch_size=batch_size, device=dev, probes=probes, baseline=baseline,
        offsets=DEFAULT_OFFSETS if offsets is None else offsets, max_classes=max_classes, l2_mode=l2_mode,
        progress=progress, seed=seed, threads=threads, lens_positions=lens_positions)
