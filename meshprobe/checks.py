"""Checks every command runs on its inputs before any work or write: can an output path be made, does a size
fit in this machine's memory. Both raise :class:`~meshprobe.errors.UserError` with one line naming the input.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from meshprobe.errors import UserError

PSEUDO_FILE_SYSTEMS = ("/proc", "/sys", "/dev")
"""Kernel file systems: nothing meshprobe writes belongs there (and creating files there fails, or worse)."""


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def gib(n_bytes: float) -> str:
    """A byte count as ``"12.3 GiB"``."""
    return f"{n_bytes / 2**30:.1f} GiB"


def check_fits(n_bytes: int, what: str, available: int | None = None) -> None:
    """Refuse `what` when it needs more than `available` bytes (default: this machine's physical memory),
    before anything is allocated. Callers pass a lower estimate, so a refusal is never wrong."""
    available = machine_memory() if available is None else available
    if available and n_bytes > available:
        raise UserError(f"{what} needs about {gib(n_bytes)}, more than the {gib(available)} here")


def _first_existing(path: Path) -> Path:
    """The deepest existing ancestor of `path` (`path` itself when it exists)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_out_path(path: str | os.PathLike, kind: str = "folder", inputs: tuple = (),
                   input_kind: str = "input", name: str = "out") -> Path:
    """Check that the output `path` (a ``"folder"`` or a ``"file"``) can be created or replaced, before any work:
    no symlink loop, not under a file, not under /proc, /sys or /dev, its first existing ancestor writable, an
    existing `path` of the right kind, and not one of `inputs` (folders the command reads, named `input_kind`
    in the message, e.g. "checkpoint") nor inside one. Messages name the path as ``{name}=PATH`` (the caller's
    parameter; the CLI shows its flag). Creates nothing. Returns the real path (symlinks resolved)."""
    given = Path(path).expanduser()
    try:
        real = Path(os.path.realpath(given, strict=False))
        os.stat(given)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{name}={path} is a symlink loop") from None
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise UserError(f"{name}={path}: {exc.strerror}") from None
    if not real.name:
        raise UserError(f"{name}={path}: give a {kind} below the file-system root")
    for root in PSEUDO_FILE_SYSTEMS:
        if real == Path(root) or Path(root) in real.parents:
            raise UserError(f"{name}={path} is under {root}, a kernel file system: choose another place")
    anchor = _first_existing(real)
    if anchor != real and not anchor.is_dir():
        raise UserError(f"{name}={path}: {anchor} is a file, not a folder")
    if anchor == real:
        if kind == "file" and real.is_dir():
            raise UserError(f"{name}={path} is a folder; give a file name")
        if kind == "folder" and not real.is_dir():
            raise UserError(f"{name}={path} exists and is a file, not a folder")
        anchor = real.parent
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"{name}={path}: {anchor} is not writable")
    for source in inputs:
        src = Path(os.path.realpath(Path(source).expanduser()))
        if real == src or src in real.parents:
            raise UserError(f"{name}={path} is {'the' if real == src else 'inside the'} {input_kind} {source}; "
                            f"give another {kind}")
    return real
