"""Small file jobs shared by every module: atomic writes, staging folders, advisory locks and JSONL logs.

Every file meshprobe writes goes to a temporary name in the same folder first and is renamed into place
(``os.replace`` is atomic on one file system), so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
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


_LEFTOVER = re.compile(r"\.(tmp|old)-(\d{20})-(\d+)(?:-[A-Za-z0-9_]+)?$")


def real_path(path: str | os.PathLike) -> Path:
    """`path` with every symlink resolved (also for a path that does not exist yet): locks and folder
    switches act on the real folder, so two names for one folder share one lock."""
    return Path(os.path.realpath(Path(path).expanduser()))


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A fresh temp folder ``.NAME.tmp-<time ns>-<pid>-<random>`` beside `path` (same file system, so it can
    be renamed onto it), with the usual permissions. The time orders interrupted saves (newest wins) and the
    pid tells a live writer's folder from a dead one's (:func:`leftovers`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-{time.time_ns():020d}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the renamed folder should not be
    return tmp


def leftovers(path: str | os.PathLike) -> list[tuple[str, int, int, Path]]:
    """Folders an interrupted :func:`make_temp_dir` / :func:`replace_dir` left beside `path`:
    ``(kind "tmp" | "old", time ns, pid, folder)``, newest first."""
    path = Path(path)
    prefix = f".{path.name}."
    found = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        m = _LEFTOVER.fullmatch(e.name[len(prefix) - 1:])
        if m and e.is_dir(follow_symlinks=False):
            found.append((m.group(1), int(m.group(2)), int(m.group(3)), Path(e.path)))
    return sorted(found, key=lambda t: -t[1])


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are never in progress when we look
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def read_json(path: str | os.PathLike, what: str = "file"):
    """The JSON value of a file a user gave (or damaged); one-line UserError naming it when it cannot be read,
    is not UTF-8 JSON, or is nested too deeply for Python's parser (a RecursionError otherwise)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (not UTF-8: invalid byte at offset {exc.start})") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None


def is_complete(folder: Path, marker: str) -> bool:
    """True when `folder/marker` (the file a writer puts last) is a complete JSON object."""
    try:
        return isinstance(read_json(folder / marker), dict)
    except UserError:
        return False


def committed_dir(path: str | os.PathLike, marker: str) -> Path:
    """The newest complete version of a folder written with :func:`replace_dir`: a complete temp folder (a
    save killed before its switch: it is newer than `path`), else `path`, else a complete ``.old-*`` folder
    (killed between the two renames of the switch). Returns `path` itself when nothing is complete, so the
    caller reports the real problem. Reads only: :func:`recover_dir` does the repair, under a lock."""
    path = Path(path)
    found = leftovers(path)
    for kind, _, _, folder in found:
        if kind == "tmp" and is_complete(folder, marker):
            return folder
    if is_complete(path, marker):
        return path
    for kind, _, _, folder in found:
        if kind == "old" and is_complete(folder, marker):
            return folder
    return path


def recover_dir(path: str | os.PathLike, marker: str, locked: bool = False) -> Path:
    """Finish a switch that a crash interrupted: the newest complete version (:func:`committed_dir`) becomes
    `path`, and the leftovers of dead processes are removed (locked=True: the caller holds the folder's lock,
    so every leftover is dead). Every step is a single rename or the removal of a folder whose marker goes
    first, so a crash here is recovered by the next call. Returns `path`."""
    path = Path(path)

    def dead(pid: int) -> bool:
        return locked or not _pid_alive(pid)

    best = committed_dir(path, marker)
    if best != path:
        _, _, pid, _ = next(t for t in leftovers(path) if t[3] == best)
        if dead(pid):
            replace_dir(best, path, marker=marker)
    for _, _, pid, folder in leftovers(path):
        if dead(pid):
            remove_dir(folder, first=marker)
    return path


def remove_dir(folder: Path, first: str | None = None) -> None:
    """Delete a folder; `first` (its marker file) is unlinked before anything else, so a crash halfway
    never leaves something that looks complete."""
    if first is not None:
        try:
            (folder / first).unlink()
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


def replace_dir(new: Path, path: Path, marker: str | None = None) -> None:
    """Move folder `new` to `path`. An existing `path` is first renamed to ``.NAME.old-<ns>-<pid>`` and
    deleted once the move succeeded; a crash between the two renames leaves both complete folders, which
    :func:`committed_dir` finds and :func:`recover_dir` puts back."""
    old = None
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.old-{time.time_ns():020d}-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        remove_dir(old, first=marker)


def move_into(tmp: Path, out: Path, last: tuple[str, ...] = ("report.md", "metrics.json")) -> list[Path]:
    """Move every file of folder `tmp` to the same relative path in `out`, one atomic rename each, the files
    named in `last` last and in that order (by default report.md, then metrics.json), so a new commit-point file
    only appears once every file it describes is in place, even if the process is killed halfway. Returns the
    moved paths."""
    files = sorted((p for p in tmp.rglob("*") if p.is_file()),
                   key=lambda p: (last.index(p.name) + 1 if p.name in last else 0, str(p)))
    moved = []
    for f in files:
        dest = out / f.relative_to(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
        moved.append(dest)
    return moved


@contextmanager
def atomic_dir(path: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path` to write a whole folder into, its `marker` file (the one that says
    it is complete) last; on success every file gets the usual permissions (safetensors writes 0600) and the
    folder replaces `path` (:func:`replace_dir`: a reader sees the old folder or the new one, never a mix); on
    error it is removed, marker first."""
    path = Path(path)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        replace_dir(tmp, path, marker=marker)
    except BaseException:
        remove_dir(tmp, first=marker)
        raise


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
def created_parents(path: str | os.PathLike) -> Iterator[None]:
    """Create the missing parent folders of `path`; if the block fails, remove those it created that are
    still empty (bad input leaves nothing behind)."""
    missing = []
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, busy_message: str | None = None,
              remove: bool = False, mkdir: bool = True) -> Iterator[None]:
    """An exclusive advisory lock (``fcntl.flock``) on `path`; a no-op where fcntl is missing.

    blocking=False raises UserError(busy_message) when another process holds the lock. remove=True deletes
    the lock file on exit (for locks that name a resource, like a checkpoint being trained); a lock file
    that a killed process left behind is simply taken (the kernel released its flock) and removed on exit.
    mkdir=False: the folder of `path` must exist (nothing is created)."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            f.close()
            raise UserError(busy_message or f"{path} is locked by another process") from None
        try:  # the holder before us may have removed the file: then our lock is on a dead inode, retry
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        if remove:
            try:
                path.unlink()
            except OSError:
                pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def out_lock(out: str | os.PathLike, command: str):
    """The lock of an output folder (`meshprobe train` / `analyze` --out): ``.NAME.lock`` beside the *real*
    folder (symlinks resolved), non-blocking, removed on exit. The parent folder must exist."""
    real = real_path(out)
    if not real.name:
        raise UserError(f"--out {out}: give a folder below the file-system root")
    lock = real.parent / f".{real.name}.lock"
    return file_lock(lock, blocking=False, remove=True, mkdir=False,
                     busy_message=f"{out} is being written by another meshprobe {command} process (lock {lock})")


def read_jsonl(path: str | os.PathLike, max_step: int | None = None) -> list[dict]:
    """Records of a JSONL file (``[]`` if it does not exist), keeping those with ``step <= max_step``; stops
    at a torn last line (a crash while appending). One-line UserError naming the file when it is a folder, not
    UTF-8, or holds a record that is not an object with an integer ``step`` (when there is one)."""
    path = Path(path)
    records: list[dict] = []
    if not os.path.lexists(path):
        return records
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            break
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise UserError(f"{path}:{lineno}: expected a JSON object with an integer step, got {line[:60]!r}")
        if max_step is None or step <= max_step:
            records.append(rec)
    return records


def jsonl_text(records: Iterable[dict]) -> str:
    """The JSONL text of `records` (one object per line)."""
    return "".join(json.dumps(r) + "\n" for r in records)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record to a JSONL file (a live log; the complete file is rewritten atomically at saves)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
