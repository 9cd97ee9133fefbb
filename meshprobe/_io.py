"""Small file jobs shared by every module: atomic writes, staging folders, advisory locks and JSONL logs.

Every file meshprobe writes goes to a temporary name in the same folder first and is renamed into place
(``os.replace`` is atomic on one file system), so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from meshprobe.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same folder; on success it replaces `path` (atomic rename), on error it is
    removed. The file gets the usual permissions (mkstemp would make it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data, indent: int | None = 2, allow_nan: bool = True) -> Path:
    """Write `data` as JSON to `path` atomically."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=allow_nan))


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a file atomically (the copy appears under its final name only when complete)."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A fresh temp folder beside `path` (same file system, so it can be renamed onto it), with the usual
    permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the renamed folder should not be
    return tmp


def replace_dir(new: Path, path: Path) -> None:
    """Move folder `new` to `path`; an existing `path` is kept aside until the move succeeded."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_into(tmp: Path, out: Path) -> list[Path]:
    """Move every file of folder `tmp` to the same relative path in `out` (metrics.json and report.md last,
    so they only appear once every figure they describe is in place). Returns the moved paths."""
    files = sorted((p for p in tmp.rglob("*") if p.is_file()),
                   key=lambda p: (p.name in ("metrics.json", "report.md"), str(p)))
    moved = []
    for f in files:
        dest = out / f.relative_to(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
        moved.append(dest)
    return moved


@contextmanager
def staging_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `out` to write a set of outputs into; it is always removed afterwards
    (call :func:`move_into` at the end of the block to publish its files)."""
    tmp = make_temp_dir(Path(out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, busy_message: str | None = None,
              remove: bool = False) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) on `path`; a no-op where fcntl is missing.

    blocking=False raises UserError(busy_message) when another process holds the lock. remove=True deletes
    the lock file on exit (for locks that name a resource, like a checkpoint being trained)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            raise UserError(busy_message or f"{path} is locked by another process") from None
        try:
            yield
        finally:
            if remove:
                try:
                    path.unlink()
                except OSError:
                    pass
            fcntl.flock(f, fcntl.LOCK_UN)


def read_jsonl(path: str | os.PathLike, max_step: int | None = None) -> list[dict]:
    """Records of a JSONL file (``[]`` if it does not exist), keeping those with ``step <= max_step``; stops
    at a torn last line (a crash while appending)."""
    path = Path(path)
    records: list[dict] = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if max_step is None or rec.get("step", 0) <= max_step:
            records.append(rec)
    return records


def jsonl_text(records: Iterable[dict]) -> str:
    """The JSONL text of `records` (one object per line)."""
    return "".join(json.dumps(r) + "\n" for r in records)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record to a JSONL file (a live log; the complete file is rewritten atomically at saves)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
