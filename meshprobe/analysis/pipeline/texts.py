"""Which text each model reads, and whether models whose tokenizers differ may be compared (torch-free: the CLI
runs :func:`check_same_text` before torch loads, the library again before any model loads).

Token ids mean the same text to two models only when their tokenizers are the same: the same tokenizer files
(a hash of tokenizer.json and the like; a checkpoint's newest complete save), or none and the same vocabulary
size. Models whose tokenizers differ are compared only on the same text through each model's own tokenizer:
``data`` (a corpus spec), or the same default corpus; given token ids, or each checkpoint's own token sample
(``val_tokens.npy``), are different text to each model and are refused in one line naming ``data``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from meshprobe.checkpoint import VAL_TOKENS_FILE as BUNDLED_TOKENS
from meshprobe.errors import UserError

__all__ = ["check_same_text", "tokenizer_identity", "bundled_tokens", "default_data_spec", "BUNDLED_TOKENS"]

HASHED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def bundled_tokens(path: str | os.PathLike) -> Path | None:
    """The checkpoint's own validation sample (``val_tokens.npy`` in its folder), if it ships one."""
    f = Path(path) / BUNDLED_TOKENS
    return f if f.is_file() else None


def default_data_spec(config: Mapping[str, Any]):
    """The corpus a checkpoint was trained on (its train metadata), else shakespeare."""
    meta = config.get("metadata") or {}
    train = meta.get("train") or {}
    if train.get("data"):
        return train["data"]
    data = meta.get("data") or {}
    if isinstance(data, dict) and data.get("spec"):
        return data["spec"]
    if isinstance(data, (str, list)) and data:
        return data
    return "shakespeare"


def spec_text(spec) -> str:
    """A corpus spec (a string or a list of them) as text."""
    return spec if isinstance(spec, str) else " + ".join(spec)


def _vocab_size(config: Mapping) -> int | None:
    model = config.get("model") if isinstance(config.get("model"), dict) else None
    for c in (model, config, config.get("text_config")):
        if isinstance(c, dict) and isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def tokenizer_identity(path: str | os.PathLike, config: Mapping) -> str:
    """What makes two models' token ids mean the same text: a hash of the folder's tokenizer files
    (tokenizer.json, ...; a checkpoint's newest complete save), or its vocabulary size when it has none."""
    from meshprobe._io import committed_dir

    folder = committed_dir(path, "config.json")
    files = [folder / name for name in HASHED_TOKENIZER_FILES if (folder / name).is_file()]
    if not files:
        return f"no tokenizer, vocab {_vocab_size(config)}"
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _text_read(path, config: Mapping, data, hf: bool) -> str | None:
    """The text a model reads without given tokens: a corpus spec, or None for its own token sample."""
    if data:
        return spec_text(data)
    if hf:
        return "shakespeare"
    return None if bundled_tokens(path) is not None else spec_text(default_data_spec(config))


def check_same_text(paths: Sequence, configs: Sequence[Mapping], *, tokens: str | None = None, data=None,
                    hf: bool = False) -> None:
    """Refuse, before any model loads, to compare models whose tokenizers differ unless each reads the same text
    through its own tokenizer. ``tokens``: the name of given token ids (a path), if any; ``data``: the corpus
    spec asked for; ``hf``: transformers directories (their default text is shakespeare)."""
    ids = [tokenizer_identity(p, c) for p, c in zip(paths, configs)]
    other = next((i for i in range(1, len(ids)) if ids[i] != ids[0]), None)
    if other is None:
        return
    a, b = paths[0], paths[other]
    va, vb = _vocab_size(configs[0]), _vocab_size(configs[other])
    what = f"vocab {va} and {vb}" if va != vb else "different tokenizer files"
    fix = "compare them on the same text with data=SPEC (a corpus, through each model's own tokenizer)"
    if tokens is not None:
        raise UserError(f"tokens={tokens}: {a} and {b} have different tokenizers ({what}), so the same token ids "
                        f"are different text to each; {fix}")
    texts = {_text_read(p, c, data, hf) for p, c in zip(paths, configs)}
    if None in texts or len(texts) > 1:
        raise UserError(f"{a} and {b} have different tokenizers ({what}) and would each read their own validation "
                        f"text; {fix}")
