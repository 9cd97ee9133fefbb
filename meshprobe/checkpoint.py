"""Checkpoints: a directory with `config.json` + `model.safetensors` (+ `tokenizer.json`, training state).

Nothing is ever unpickled: weights are safetensors, everything else JSON or text. Tied core weights live
once in the model (one `core` stack), so they are stored once.

The save protocol survives SIGKILL at any instant. A save writes the new checkpoint into
``.NAME.tmp-<ns>-<pid>-*`` beside the target, ``config.json`` last (a folder with a complete config.json is
complete), then switches: ``NAME`` -> ``.NAME.old-<ns>-<pid>``, temp folder -> ``NAME``, old folder deleted
(config.json first). A kill before the switch leaves a complete temp folder newer than ``NAME``; a kill
between the two renames leaves no ``NAME`` but both complete folders. Readers (:func:`load_checkpoint`,
:func:`read_checkpoint_config`, ``meshprobe info``, ``train --resume``) take the newest complete one
(:func:`resolve_checkpoint`: complete temp folder, else ``NAME``, else a complete old folder) without
changing anything; the next save (and ``meshprobe train``, under its lock, before its first write) finishes
the switch and removes what dead processes left (:func:`recover_checkpoint`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meshprobe import _io
from meshprobe.config import ModelConfig, check_memory
from meshprobe.data.tokenizer import TOKENIZER_FILE, load_tokenizer  # noqa: F401  (re-exported)
from meshprobe.errors import UserError

if TYPE_CHECKING:  # torch loads inside the functions: reading a config stays cheap
    import torch

FORMAT = "meshprobe-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
CONFIG_KEYS = ("format", "format_version", "model", "metadata")
VAL_TOKENS_FILE = "val_tokens.npy"  # a checkpoint's own validation sample [N, seq] (bundled checkpoints ship one)
_warned: set[str] = set()


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or does not match its config. The message names the file."""


def save_checkpoint(
    model,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    files: dict[str, bytes | str] | None = None,
    dtype: torch.dtype | None = None,
    **metadata,
) -> Path:
    """Write `model` to directory `path` atomically and return the path.

    tokenizer: a `tokenizers.Tokenizer` or its JSON string, saved as tokenizer.json.
    files: extra files (name -> bytes or text), e.g. the training state; names must be plain file names.
    dtype: store weights in this dtype (e.g. torch.float16 for bundled checkpoints).
    metadata: JSON-serializable values stored under "metadata" in config.json.
    """
    from safetensors.torch import save_file

    given, path = Path(path), _io.real_path(path)  # a symlinked checkpoint is replaced where it really lives
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "metadata": metadata,
    }
    for name in files or {}:
        if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE) or name.startswith("."):
            raise ValueError(f"extra checkpoint file name {name!r} must be a plain, unreserved file name")
    tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    recover_checkpoint(path)  # finish a save that a crash interrupted before starting a new one
    with _io.atomic_dir(path, marker=CONFIG_FILE) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if tokenizer is not None:
            text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
            (tmp / TOKENIZER_FILE).write_text(text)
        for name, content in (files or {}).items():
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))  # last: it marks the folder complete
    return given


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The folder holding the newest complete checkpoint saved to `path`: `path` itself, or what a save
    killed mid-switch left beside it (see the module docstring). Reads only; `path` when nothing is complete."""
    return _io.committed_dir(_io.real_path(path), CONFIG_FILE)


def recover_checkpoint(path: str | os.PathLike, locked: bool = False) -> Path:
    """Make `path` the newest complete checkpoint saved to it and delete the leftovers of dead processes
    (locked=True: the caller holds the folder's lock, as ``meshprobe train`` does, so all leftovers are dead)."""
    return _io.recover_dir(_io.real_path(path), CONFIG_FILE, locked=locked)


def check_loops(path: str | os.PathLike, loops) -> None:
    """Refuse, before any work, loop counts (an iterable of ints) the checkpoint at `path` cannot run with
    (:meth:`ModelConfig.with_loops`); the UserError names the checkpoint."""
    cfg = ModelConfig.from_dict(read_checkpoint_config(path)["model"])
    for k in loops:
        try:
            cfg.with_loops(k)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None


def _beyond_loop(name: str, loops: int) -> bool:
    """True for a parameter of loop step t >= loops (``loop.{t}.*``)."""
    parts = name.split(".")
    return parts[0] == "loop" and parts[1].isdigit() and int(parts[1]) >= loops


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """Parse and validate `config.json` of a checkpoint (the newest complete one saved to `path`, see
    :func:`resolve_checkpoint`); returns the whole JSON dict. An unknown top-level key (a newer meshprobe may
    add some) gives a one-line warning on stderr and is ignored."""
    given = Path(path)
    path = resolve_checkpoint(given)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {given}")
    config_path = path / CONFIG_FILE
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{given} is not a meshprobe checkpoint (no {CONFIG_FILE} in it)")
    try:
        config = _io.read_json(config_path)
    except UserError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{config_path}: not a meshprobe checkpoint config (format != {FORMAT!r})")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{config_path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format version {version} is newer than this meshprobe")
    if not isinstance(config["model"], dict) or not isinstance(config.get("metadata", {}), dict):
        raise CheckpointError(f"{config_path}: 'model' and 'metadata' must be JSON objects")
    try:
        ModelConfig.from_dict(config["model"])
    except (UserError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid model config ({exc})") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown and str(config_path) not in _warned:
        _warned.add(str(config_path))
        print(f"meshprobe: warning: {config_path}: unknown top-level key(s) {', '.join(map(repr, unknown))} "
              "ignored (written by a newer meshprobe?)", file=sys.stderr)
    return config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    loops: int | None = None):
    """Load a checkpoint directory and return the model (eval mode, weights cast to `dtype`, default float32).

    loops: run a looped model ("P+CRK+Q") with this many loop steps instead of its trained K (test-time depth:
    the tied core repeats `loops` times; `model.cfg` has the new layout, `checkpoint_config` stays the file's).
    A variant with per-step parameters (MeSH routers, comb scalars) takes its first `loops` steps' parameters
    and refuses more steps than trained; vanilla and unshared block layouts refuse `loops`
    (:meth:`ModelConfig.with_loops`).

    The checkpoint's config.json is attached as `model.checkpoint_config` and the folder it was read from
    (`path`, or what an interrupted save left beside it: :func:`resolve_checkpoint`) as `model.checkpoint_dir`;
    `load_tokenizer(model.checkpoint_dir)` reads the tokenizer. Every failure is a one-line CheckpointError:
    a model too large for this machine's memory is refused before anything is allocated.
    """
    for attempt in range(3):  # a concurrent save may switch folders between our reads: read again
        try:
            return _load(path, device, dtype, loops)
        except FileNotFoundError:
            if attempt == 2:
                raise CheckpointError(f"checkpoint {path} kept changing while it was read") from None
    raise AssertionError  # pragma: no cover


def _load(path, device, dtype, loops=None):
    config = read_checkpoint_config(path)  # before torch loads: a bad path or config answers at once
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from meshprobe.model import build_model

    dtype = torch.float32 if dtype is None else dtype
    folder = resolve_checkpoint(path)
    model_cfg = ModelConfig.from_dict(config["model"])
    if loops is not None:
        model_cfg = model_cfg.with_loops(loops)
    try:
        check_memory(model_cfg, 4, "its fp32 weights")
    except UserError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: truncated or corrupt ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointError(f"{weights_path}: cannot read ({exc})") from None
    if loops is not None:  # fewer steps than trained: the later steps' parameters are not used
        tensors = {k: v for k, v in tensors.items() if not _beyond_loop(k, loops)}
    model = build_model(model_cfg, device="meta")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: does not match config.json (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
        if not (tensor.is_floating_point() or tensor.dtype == expected[name].dtype):
            raise CheckpointError(f"{weights_path}: {name} has dtype {tensor.dtype}, expected floating point")
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    model.reset_rotary()
    model.checkpoint_config = config
    model.checkpoint_dir = folder
    return model.eval()
