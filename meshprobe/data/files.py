"""Reading text files: user paths (.txt / .txt.gz / .txt.xz, .jsonl, .parquet, folders), files written by
:func:`meshprobe.data.pack.pack`, and the hashing helpers that fingerprint them."""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from meshprobe.errors import UserError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
USER_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
SPLITS = ("train", "val")

# The pack format (written by meshprobe.data.pack.pack; read here like any other user file)
PACK_MAGIC = "@@meshprobe-pack"
PACK_DOC = "@@meshprobe-doc"
PACK_ESC = "@@meshprobe-esc:"
_PACK_PREFIX = "@@meshprobe"


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


def _read_text_file(path: Path, strict: bool = False) -> str:
    """The text of a .txt / .txt.gz / .txt.xz file. strict (user files): a file that is not UTF-8 text
    (invalid UTF-8, or NUL bytes: binary data or UTF-16) is refused with a UserError rather than trained on
    as U+FFFD characters; otherwise (the named corpora's system files) bad bytes become U+FFFD."""
    name = path.name
    opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return check_text(raw, path) if strict else raw.decode("utf-8", errors="replace")


def check_text(raw: bytes, path: Path, lineno: int | None = None) -> str:
    """Decode UTF-8 strictly; UserError naming the file (and byte offset or line) when it is not text."""
    where = f"{path}:{lineno}" if lineno else str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start}); meshprobe reads "
                        "UTF-8 text only") from None
    if "\x00" in text:
        raise UserError(f"{where}: contains NUL bytes (binary data or UTF-16?); meshprobe reads UTF-8 text only")
    return text


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
    try:
        yield from _read_packed_docs(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _read_packed_docs(path: Path) -> Iterator[_Doc]:
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
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = check_text(raw, path, lineno)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from None
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
                yield _Doc(self.name, rel, _read_text_file(p, strict=True))

    def doc_ids(self) -> list[str]:
        """Ids of the documents that the split rule places (packed documents keep their own split)."""
        if all(p.name.endswith(TEXT_SUFFIXES) and not _is_packed(p) for p in self.files):
            return [p.relative_to(self.root).as_posix() for p in self.files]  # no need to read the text
        return [d.doc_id for d in self.docs() if d.split is None and d.text.strip()]

    def fingerprint(self) -> str:
        return _sha(str(self.path.resolve()) + "\0" + _files_fingerprint(self.files, self.root))
