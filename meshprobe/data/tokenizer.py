"""The tokenizer: byte-level BPE trained on a corpus' train split (``<|endoftext|>`` = id 0), cached by corpus
fingerprint; saving and loading tokenizer.json."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from meshprobe._io import atomic_path, committed_dir, file_lock
from meshprobe.data.corpus import Corpus, open_corpus
from meshprobe.data.files import _sha
from meshprobe.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

CHUNK_CHARS = 100_000
"""Text is fed to `tokenizers` in pieces of at most this many characters (one huge string makes it hang)."""
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_FILE = "tokenizer.json"


def _pieces(text: str, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut text into pieces of at most max_chars, preferably right after a newline that ends a non-blank line."""
    start, n = 0, len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = -1
        pos = end
        while True:
            nl = text.rfind("\n", start + max_chars // 2, pos)
            if nl == -1:
                break
            if nl > start and not text[nl - 1].isspace():
                cut = nl + 1
                break
            pos = nl
        if cut == -1:
            nl = text.rfind("\n", start + 1, end)
            cut = nl + 1 if nl != -1 else end
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _chunks(documents: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Group documents into strings of about max_chars for BPE training."""
    buf: list[str] = []
    size = 0
    for doc in documents:
        for piece in _pieces(doc, max_chars):
            buf.append(piece)
            size += len(piece)
            if size >= max_chars:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def train_tokenizer(documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                    show_progress: bool = False) -> "tokenizers.Tokenizer":
    """Train a byte-level BPE tokenizer; ``<|endoftext|>`` is id 0 (the document separator).

    Documents are fed to ``train_from_iterator`` in ~100 kB strings (one huge string makes tokenizers hang).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UserError(f"vocab_size must be at least 258 for byte-level BPE, not {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def feed():
        for chunk in _chunks(documents):
            seen[0] += len(chunk)
            yield chunk

    tok.train_from_iterator(feed(), trainer=trainer)
    if seen[0] == 0:
        raise UserError("cannot train a tokenizer on an empty corpus")
    assert tok.token_to_id(EOT_TOKEN) == EOT_ID
    return tok


def save_tokenizer(tok: "tokenizers.Tokenizer", path: str | os.PathLike) -> Path:
    """Write the tokenizer JSON atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(tok.to_str(), encoding="utf-8")
    return path


def load_tokenizer(path: str | os.PathLike, *, missing_ok: bool = False) -> "tokenizers.Tokenizer | None":
    """Load a tokenizer from a ``tokenizer.json`` file or a checkpoint directory (its tokenizer.json).

    A missing file raises UserError, or returns None with ``missing_ok=True``; an unreadable one raises
    UserError naming the file."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir() or not path.exists():  # a checkpoint folder: its newest complete save (meshprobe.checkpoint)
        folder = committed_dir(path, "config.json")
        file = folder / TOKENIZER_FILE if folder.is_dir() else path
    else:
        file = path
    if not file.is_file():
        if missing_ok:
            return None
        raise UserError(f"tokenizer file not found: {file}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"cannot load tokenizer {file}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def default_cache_dir() -> Path:
    """Token and tokenizer cache: ``$MESHPROBE_CACHE`` if set, else ``~/.cache/meshprobe/tokens``
    (``$XDG_CACHE_HOME/meshprobe/tokens`` when XDG_CACHE_HOME is set)."""
    env = os.environ.get("MESHPROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "meshprobe" / "tokens"


def cached_tokenizer(corpus: Corpus | str | Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                     cache_dir: str | os.PathLike | None = None,
                     on_train: Callable[[], None] | None = None) -> "tokenizers.Tokenizer":
    """Train a tokenizer on the corpus' train documents once; later calls load it from the cache.

    Kept at ``<cache_dir or default_cache_dir()>/tokenizer-<sha256(corpus fingerprint, vocab_size)>.json``.
    Before training, every document is read and checked (:meth:`Corpus.check`), so bad data is a UserError
    with nothing written to the cache; `on_train` is then called (e.g. to announce the training).
    """
    corpus = open_corpus(corpus)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _sha(f"bpe-bytelevel-v1\0{vocab_size}\0{corpus.fingerprint}")[:32]
    path = root / f"tokenizer-{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    corpus.check()
    with file_lock(root / f"tokenizer-{key}.lock"):
        if path.is_file():  # another process trained it meanwhile
            return load_tokenizer(path)
        if on_train is not None:
            on_train()
        tok = train_tokenizer(corpus.train_documents(), vocab_size)
        save_tokenizer(tok, path)
        return tok
