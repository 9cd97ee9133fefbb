"""Which tokens a model is analysed on: the one resolver for every kind of model.

    tokens, source = resolve_tokens(model, path, TokenRequest(samples=64))   # any model, any request

:func:`resolve_tokens` is called by ``meshprobe analyze`` (checkpoints and transformers directories alike),
``mp.analyze``, the task analyses and ``meshprobe figures``. The first rule that applies picks the tokens:

1. **given tokens** (``TokenRequest.tokens``: a ``.npy`` path, an array or a tensor): its first ``samples`` rows
   and first ``seq_len`` columns (default all), for every kind of model;
2. **a transformers looped LM** (:mod:`meshprobe.hf`): ``samples`` windows (default 500) of ``seq_len`` tokens
   (default min(256, context)) from the validation split of ``data`` (default shakespeare) through the
   directory's own tokenizer;
3. **a task checkpoint** (trained with ``--data task:...``): ``samples`` evaluation sequences (default 256) of
   its task at evaluation seed ``seed`` (``data``, when given, must name the same task);
4. **a meshprobe checkpoint**: without ``data``, its own validation sample ``val_tokens.npy`` (bundled
   checkpoints ship one, so they analyze on any machine); else ``samples`` windows of ``seq_len`` tokens from
   the validation split of its training corpus (``data`` overrides it) through its own tokenizer.

Windows drawn from a corpus do not overlap when the split is long enough. :func:`token_shape` finds what rule 4
will give without loading the model. :func:`~meshprobe.analysis.pipeline.texts.check_same_text` (torch-free)
refuses, before any model loads, a comparison of models whose tokenizers differ unless every model reads the same
text (``data``, or the same default corpus) through its own tokenizer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from meshprobe.analysis.pipeline.collect import check_tokens
from meshprobe.analysis.pipeline.texts import (BUNDLED_TOKENS, bundled_tokens, check_same_text, default_data_spec,
                                               spec_text, tokenizer_identity)
from meshprobe.errors import UserError

__all__ = ["TokenRequest", "resolve_tokens", "given_tokens", "sample_tokens", "hf_sample_tokens", "task_batch",
           "load_token_file", "check_token_shapes", "token_shape", "bundled_tokens", "default_data_spec",
           "check_same_text", "tokenizer_identity", "DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN", "DEFAULT_TASK_SEQUENCES",
           "BUNDLED_TOKENS"]

DEFAULT_SAMPLES = 500
DEFAULT_SEQ_LEN = 256
DEFAULT_TASK_SEQUENCES = 256
CHUNK_CHARS = 100_000  # one tokenizer call per chunk (one huge string was measured to stall fast tokenizers)


@dataclass(frozen=True)
class TokenRequest:
    """What the caller asked for (the same for every model of a run); :func:`resolve_tokens` turns it into the
    tokens of one model. ``tokens``: a .npy path, an integer array or tensor [N, seq], or None; ``label``: how
    given tokens are named in metrics.json (default: their path, else "tokens given to analyze_model")."""

    tokens: Any = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    data: Any = None
    label: str | None = None

    def opened(self) -> TokenRequest:
        """The same request with a token file read (once, before any model loads; UserError if unreadable)."""
        if not isinstance(self.tokens, (str, os.PathLike)):
            return self
        return replace(self, tokens=load_token_file(self.tokens), label=self.label or str(self.tokens))


def resolve_tokens(model, path: str | os.PathLike | None = None, request: TokenRequest | None = None
                   ) -> tuple[torch.Tensor, str]:
    """``(tokens [N, seq] int64, where they came from)`` for ``model`` (its folder ``path``, if any) under
    ``request``: the rules of this module's docstring, in order."""
    request = request or TokenRequest()
    if request.tokens is not None:
        return _given(model, path, request)
    if getattr(model.cfg, "is_hf", False):
        return _hf_dir_tokens(model, path, request)
    if _task_entry(model) is not None:
        batch, spec = task_batch(model, request)
        return (torch.from_numpy(np.asarray(batch.tokens, dtype=np.int64)),
                f"evaluation sequences of {spec.spec_string()} (seed {request.seed})")
    return _checkpoint_tokens(model, path, request)


def _given(model, path, request: TokenRequest) -> tuple[torch.Tensor, str]:
    """Rule 1, checked against the model's context and vocabulary."""
    rows, source = given_tokens(request, n_ctx=model.cfg.n_ctx, where=path)
    return check_tokens(rows, model.cfg), source


def given_tokens(request: TokenRequest, *, n_ctx: int | None = None, where=None) -> tuple[torch.Tensor, str]:
    """``(rows [samples, seq_len] int64, source)`` of the tokens given in ``request`` (a path is read first),
    without a model: what rule 1 gives before the model's own checks (``n_ctx``: a context to check against)."""
    request = request.opened()
    arr = request.tokens
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu()
    elif not isinstance(arr, np.ndarray):
        arr = np.asarray(arr)
    if arr.ndim != 2:
        raise UserError(f"tokens must be a 2-d array [samples, seq_len], got shape {tuple(arr.shape)}")
    label = request.label or "tokens given to analyze_model"
    check_token_shapes([{"model": {"n_ctx": n_ctx if n_ctx is not None else 1 << 62}}], [where or "the model"],
                       arr, label, request.samples, request.seq_len)
    rows = arr[:request.samples, :request.seq_len]
    if isinstance(rows, np.ndarray):  # integer arrays of any width -> int64 (only the rows used are copied)
        if rows.dtype.kind not in "iu":
            raise UserError(f"tokens must be integers, got {rows.dtype}")
        rows = torch.from_numpy(rows.astype(np.int64))
    if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.is_complex():
        raise UserError(f"tokens must be integers, got {rows.dtype}")
    rows = rows.long().contiguous()
    if tuple(rows.shape) == tuple(arr.shape):
        return rows, label
    return rows, f"{label} (rows 0..{rows.shape[0] - 1}, {rows.shape[1]} tokens)"


def _rows(token_file: np.ndarray, samples: int | None, seq_len: int | None) -> torch.Tensor:
    rows = samples if samples is not None else token_file.shape[0]
    cols = seq_len if seq_len is not None else token_file.shape[1]
    return torch.from_numpy(np.ascontiguousarray(token_file[:rows, :cols]).astype(np.int64))


def load_token_file(path: str | os.PathLike) -> np.ndarray:
    """A pre-tokenized ``.npy`` integer array [N, seq] (never unpickled); UserError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"tokens file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"tokens={p}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise UserError(f"tokens={p}: need a 2-d integer array [N, seq], got "
                        f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")
    return arr


def check_token_shapes(configs: Sequence[Mapping], paths: Sequence, token_file, tokens_path, samples,
                       seq_len) -> None:
    """Fail before any work when the requested ``samples`` / ``seq_len`` do not fit the token array or a
    model's context (``configs``: ``{"model": {"n_ctx": ...}}`` per model)."""
    if token_file is not None:
        n_rows, n_cols = token_file.shape
        if samples is not None and samples > n_rows:
            raise UserError(f"samples={samples} but {tokens_path} has only {n_rows} rows")
        if seq_len is not None and seq_len > n_cols:
            raise UserError(f"seq_len={seq_len} but {tokens_path} has only {n_cols} tokens per row")
    for p, cfg in zip(paths, configs):
        n_ctx = cfg["model"]["n_ctx"]
        want = seq_len if seq_len is not None else (token_file.shape[1] if token_file is not None else None)
        if want is not None and want > n_ctx:
            raise UserError(f"seq_len={want} is above the context of {p} (n_ctx={n_ctx})")


# ------------------------------------------------------------------------------------- meshprobe checkpoints
def sample_tokens(ckpt, samples: int = 500, seq_len: int = 256, seed: int = 0, data=None, *, tokenizer=None,
                  split: str = "val") -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens drawn deterministically (``seed``) from the validation split
    (non-overlapping windows, :func:`~meshprobe.analysis.stats.sample_disjoint_windows`, when the split holds
    ``samples * seq_len`` tokens; else possibly overlapping ones) of the checkpoint's training corpus
    (``metadata.train.data``; ``data`` overrides it), tokenized with the checkpoint's tokenizer. ``ckpt``: a
    checkpoint path, or a loaded model (then pass ``tokenizer``; the corpus comes from
    ``model.checkpoint_config`` or ``data``). Returns a LongTensor [samples, seq_len]."""
    from meshprobe import data as D
    from meshprobe.checkpoint import read_checkpoint_config

    if samples < 2:
        raise UserError(f"need at least 2 samples, got {samples}")
    if isinstance(ckpt, (str, os.PathLike)):
        config = read_checkpoint_config(ckpt)
        tok = tokenizer or D.load_tokenizer(ckpt, missing_ok=True)
        where = str(ckpt)
    else:
        config = getattr(ckpt, "checkpoint_config", None) or {"model": ckpt.cfg.to_dict()}
        tok = tokenizer
        where = "the model"
    if tok is None:
        raise UserError(f"{where} has no tokenizer.json: pass pre-tokenized sequences (tokens=FILE.npy)")
    n_ctx = config["model"]["n_ctx"]
    if seq_len > n_ctx:
        raise UserError(f"seq_len {seq_len} is above the model context n_ctx={n_ctx}")
    if tok.get_vocab_size() > config["model"]["vocab_size"]:
        raise UserError(f"{where}: tokenizer ({tok.get_vocab_size()} ids) larger than the model vocabulary")
    corpus = D.open_corpus(data if data else default_data_spec(config), quiet=True)
    ids = D.tokenize_corpus(corpus, tok)[split]
    if len(ids) < seq_len:
        raise UserError(f"data {corpus.name}: only {len(ids)} {split} tokens, need at least seq_len = {seq_len}")
    if samples * seq_len <= len(ids):  # non-overlapping windows (no position is shared by two windows)
        from meshprobe.analysis.stats import sample_disjoint_windows

        return torch.from_numpy(sample_disjoint_windows(ids, samples, seq_len, seed))
    return torch.from_numpy(D.sample_sequences(ids, samples, seq_len, seed))


def _checkpoint_tokens(model, path, request: TokenRequest) -> tuple[torch.Tensor, str]:
    """Rule 4: the bundled sample, else windows of the corpus through the checkpoint's tokenizer."""
    samples, seq_len, data = request.samples, request.seq_len, request.data
    own = bundled_tokens(path) if path is not None and not data else None
    if own is not None:
        arr = load_token_file(own)
        check_token_shapes([{"model": {"n_ctx": model.cfg.n_ctx}}], [Path(path)], arr, own, samples, seq_len)
        rows = _rows(arr, samples, seq_len)
        return rows, f"the checkpoint's own validation sample ({BUNDLED_TOKENS}, {rows.shape[0]} x {rows.shape[1]})"
    from meshprobe.data import load_tokenizer

    samples = samples if samples is not None else DEFAULT_SAMPLES
    seq_len = seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, model.cfg.n_ctx)
    tokenizer = load_tokenizer(path, missing_ok=True) if path is not None else None
    if tokenizer is None:
        raise _no_tokenizer(path)
    spec = data if data else default_data_spec(getattr(model, "checkpoint_config", None) or {})
    try:
        tokens = sample_tokens(model, samples, seq_len, request.seed, data=data, tokenizer=tokenizer)
    except UserError as exc:
        if data:
            raise
        raise _corpus_unreadable(path, exc) from None
    return tokens, f"validation split of {spec_text(spec)}"


def _no_tokenizer(path) -> UserError:
    return UserError(f"{path or 'the model'} has no tokenizer.json and no {BUNDLED_TOKENS}: pass pre-tokenized "
                     "sequences (tokens=FILE.npy)")


def _corpus_unreadable(path, exc: UserError) -> UserError:
    return UserError(f"{path}: its training corpus cannot be read here ({exc}); pass data=SPEC (a corpus) or "
                     "tokens=FILE.npy")


def token_shape(path: str | os.PathLike, config: Mapping, *, token_file: np.ndarray | None = None,
                samples: int | None = None, seq_len: int | None = None, data=None) -> tuple[int, int]:
    """``(rows, tokens per row)`` that :func:`resolve_tokens` will give for the checkpoint at `path` (config:
    its config.json), found the same way without loading the model or reading the corpus, and with the same
    one-line errors: the token file, the bundled sample's shape, or a tokenizer and a corpus that opens."""
    if token_file is not None:
        arr = token_file
    else:
        own = bundled_tokens(path) if not data else None
        arr = load_token_file(own) if own is not None else None
        if arr is not None:
            check_token_shapes([config], [Path(path)], arr, own, samples, seq_len)
    if arr is not None:
        return (samples if samples is not None else arr.shape[0], seq_len if seq_len is not None else arr.shape[1])
    from meshprobe.data import load_tokenizer, open_corpus

    if load_tokenizer(path, missing_ok=True) is None:
        raise _no_tokenizer(path)
    try:
        open_corpus(data if data else default_data_spec(config), quiet=True)
    except UserError as exc:
        if data:
            raise
        raise _corpus_unreadable(path, exc) from None
    return (samples if samples is not None else DEFAULT_SAMPLES,
            seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, config["model"]["n_ctx"]))


# ------------------------------------------------------------------------------------------ task checkpoints
def _task_entry(model) -> dict | None:
    return ((getattr(model, "checkpoint_config", None) or {}).get("metadata") or {}).get("task")


def task_batch(model, request: TokenRequest | None = None):
    """Rule 3: ``(TaskBatch, TaskSpec)``: ``samples`` evaluation sequences (default 256) of the task the
    checkpoint was trained on, at evaluation seed ``seed``; ``data`` (a task spec), when given, must be it."""
    from meshprobe.data import tasks

    request = request or TokenRequest()
    entry = _task_entry(model)
    if entry is None:
        raise UserError("the model was not trained on a task (no metadata 'task')")
    spec = tasks.task_from_entry(entry)
    data = request.data[0] if isinstance(request.data, (list, tuple)) and len(request.data) == 1 else request.data
    if data is not None and tasks.parse_task(data) != spec:
        raise UserError(f"the checkpoint was trained on {spec.spec_string()}, not data={data}")
    n = request.samples if request.samples is not None else DEFAULT_TASK_SEQUENCES
    return tasks.eval_set(spec, n, seed=request.seed), spec


# ------------------------------------------------------------------------------- transformers looped LMs
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


def _hf_dir_tokens(model, path, request: TokenRequest) -> tuple[torch.Tensor, str]:
    """Rule 2: windows of ``data`` (default shakespeare) through the model directory's own tokenizer."""
    from meshprobe.hf.loader import load_tokenizer

    path = path if path is not None else getattr(model, "checkpoint_dir", None)
    tokenizer = load_tokenizer(path, trust_remote_code=model.trust_remote_code) if path is not None else None
    if tokenizer is None:
        raise UserError(f"{path or 'the model'} has no tokenizer: pass pre-tokenized sequences (tokens=FILE.npy)")
    samples = request.samples if request.samples is not None else DEFAULT_SAMPLES
    seq_len = request.seq_len if request.seq_len is not None else min(DEFAULT_SEQ_LEN, model.cfg.n_ctx)
    tokens = hf_sample_tokens(tokenizer, samples, seq_len, request.seed, request.data,
                              vocab_size=model.cfg.vocab_size)
    return tokens, f"validation split of {spec_text(request.data or 'shakespeare')} (the model's tokenizer)"
