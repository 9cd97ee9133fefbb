"""The token cache: each split of a corpus tokenized once into memory-mapped ``.npy`` arrays."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from meshprobe._io import atomic_path, file_lock
from meshprobe.data.corpus import Corpus, open_corpus
from meshprobe.data.files import SPLITS
from meshprobe.data.tokenizer import EOT_TOKEN, _pieces, default_cache_dir
from meshprobe.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

CACHE_VERSION = "tokens-v1"


def _progress(total=None, desc="", unit="doc"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    try:
        return tqdm(total=total, desc=desc, unit=unit, delay=2.0, leave=False, file=sys.stderr)
    except TypeError:  # very old tqdm without delay
        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def encode_documents(tokenizer: "tokenizers.Tokenizer", documents: Iterable[str], *,
                     batch_chars: int = 1_000_000,
                     on_document: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
    """Token ids of each document (int64 arrays, no EOT), encoded in ~100 kB pieces with ``encode_batch``."""
    pending: list[tuple[int, list[str]]] = []  # per document: its pieces
    size = 0

    def flush():
        flat = [p for _, ps in pending for p in ps]
        encs = tokenizer.encode_batch(flat, add_special_tokens=False) if flat else []
        i = 0
        for _, ps in pending:
            parts = [np.asarray(encs[i + j].ids, dtype=np.int64) for j in range(len(ps))]
            i += len(ps)
            yield np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            if on_document:
                on_document()

    for k, doc in enumerate(documents):
        ps = list(_pieces(doc))
        pending.append((k, ps))
        size += len(doc)
        if size >= batch_chars or len(pending) >= 256:
            yield from flush()
            pending, size = [], 0
    if pending:
        yield from flush()


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tokenizer.get_vocab_size() <= 65535 else np.dtype(np.uint32)


def tokenize_corpus(corpus: Corpus | str | Sequence[str], tokenizer: "tokenizers.Tokenizer",
                    cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Token ids of each split as read-only memory-mapped ``.npy`` arrays: ``dict(train=..., val=...)``.

    Every document is followed by the EOT id (0). dtype uint16 for vocabularies up to 65535 tokens, else uint32.
    Cached under ``<cache_dir or default_cache_dir()>/<key>/{train,val}.npy`` with
    ``key = sha256(tokenizer JSON + corpus fingerprint)``; files are written to temp names and renamed, and
    ``meta.json`` (written last) marks a complete entry, so a second call only memory-maps the files.
    """
    corpus = open_corpus(corpus)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        (CACHE_VERSION + "\0" + tokenizer.to_str() + "\0" + corpus.fingerprint).encode("utf-8")).hexdigest()
    entry = root / key[:32]
    meta_path = entry / "meta.json"

    def load():
        return _load_entry(entry, tokenizer)

    if meta_path.is_file():
        return load()
    corpus.check()  # bad data: a UserError before anything is written to the cache
    with file_lock(root / f"{key[:32]}.lock"):
        if not meta_path.is_file():  # else another process finished meanwhile
            _build_entry(corpus, tokenizer, entry)
        return load()


def _load_entry(entry: Path, tokenizer) -> dict[str, np.ndarray]:
    """Memory-map a complete cache entry, checked against its meta.json and the tokenizer (never unpickles:
    a damaged or planted file is a one-line UserError)."""
    dtype, vocab = _token_dtype(tokenizer), tokenizer.get_vocab_size()
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        arrays = {s: np.load(entry / f"{s}.npy", mmap_mode="r", allow_pickle=False) for s in SPLITS}
        for s, arr in arrays.items():
            if arr.dtype != dtype or arr.ndim != 1 or len(arr) != meta[f"{s}_tokens"]:
                raise ValueError(f"{s}.npy is {arr.dtype} {arr.shape}, meta.json says {dtype} "
                                 f"({meta[f'{s}_tokens']},)")
            top = max((int(arr[a:a + (1 << 24)].max()) for a in range(0, len(arr), 1 << 24)), default=0)
            if top >= vocab:
                raise ValueError(f"{s}.npy holds token id {top}, the tokenizer has {vocab}")
    except (OSError, ValueError, KeyError, TypeError, EOFError, RecursionError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"token cache {entry} is damaged ({detail}); delete that folder to rebuild it") from None
    return arrays


def _build_entry(corpus: Corpus, tokenizer, entry: Path) -> None:
    """Tokenize every document into ``entry/{train,val}.npy``, then write ``entry/meta.json`` (last)."""
    entry.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    if eot is None:
        raise UserError(f"the tokenizer has no {EOT_TOKEN} token")
    t0 = time.time()
    raw = {s: tempfile.NamedTemporaryFile(dir=entry, prefix=f".{s}.", suffix=".bin", delete=False) for s in SPLITS}
    try:
        counts = _encode_splits(corpus, tokenizer, raw, dtype, eot)
        for f in raw.values():
            f.close()
        for s in SPLITS:
            if counts[s]["tokens"] == 0:
                raise UserError(f"corpus {corpus.name} has no {s} documents")
            with atomic_path(entry / f"{s}.npy") as tmp:
                src = np.memmap(raw[s].name, dtype=dtype, mode="r")
                dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=src.shape)
                step = 1 << 24
                for a in range(0, len(src), step):
                    dst[a:a + step] = src[a:a + step]
                dst.flush()
                del dst, src
    finally:
        for f in raw.values():
            f.close()
            try:
                os.unlink(f.name)
            except FileNotFoundError:
                pass
    meta = dict(spec=corpus.spec, fingerprint=corpus.fingerprint, dtype=dtype.name,
                vocab_size=tokenizer.get_vocab_size(), eot_id=eot, seconds=round(time.time() - t0, 2),
                **{f"{s}_{k}": v for s in SPLITS for k, v in counts[s].items()})
    with atomic_path(entry / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _encode_splits(corpus: Corpus, tokenizer, raw: dict, dtype, eot: int) -> dict[str, dict[str, int]]:
    """Append each document's ids + EOT to the raw file of its split; returns docs / tokens per split."""
    counts = {s: dict(docs=0, tokens=0) for s in SPLITS}
    bar = _progress(desc=f"tokenizing {corpus.name}")
    splits_seen: list[str] = []

    def docs():
        for split, _, _, text in corpus.items():
            splits_seen.append(split)
            yield text

    eot_arr = np.array([eot], dtype=dtype)
    try:
        for i, ids in enumerate(encode_documents(tokenizer, docs(),
                                                 on_document=(bar.update if bar is not None else None))):
            split = splits_seen[i]
            arr = ids.astype(dtype)
            raw[split].write(arr.tobytes())
            raw[split].write(eot_arr.tobytes())
            counts[split]["docs"] += 1
            counts[split]["tokens"] += len(arr) + 1
    finally:
        if bar is not None:
            bar.close()
    return counts
