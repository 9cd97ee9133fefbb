"""Checkpoints: a directory with `config.json` + `model.safetensors` (+ `tokenizer.json`, training state).

Nothing is ever unpickled: weights are safetensors, everything else JSON or text. Tied core weights live
once in the model (one `core` stack), so they are stored once. Writes go to a temp directory beside the
target and are renamed into place, so a crash never leaves a half-written checkpoint and an existing
checkpoint at the same path stays readable until the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from meshprobe._io import make_temp_dir, replace_dir
from meshprobe.config import ModelConfig
from meshprobe.data.tokenizer import TOKENIZER_FILE, load_tokenizer  # noqa: F401  (re-exported)
from meshprobe.errors import UserError

FORMAT = "meshprobe-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "metadata": metadata,
    }
    tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    tmp = make_temp_dir(path)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
            (tmp / TOKENIZER_FILE).write_text(text)
        for name, content in (files or {}).items():
            if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE):
                raise ValueError(f"extra checkpoint file name {name!r} must be a plain, unreserved file name")
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """Parse and validate `config.json` of a checkpoint; returns the whole JSON dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    config_path = path / CONFIG_FILE
    if not path.is_dir() or not config_path.is_file():
        raise CheckpointError(f"{path} is not a meshprobe checkpoint (no {CONFIG_FILE} in it)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{config_path}: not a meshprobe checkpoint config (format != {FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format version {config['format_version']} is newer than this meshprobe")
    try:
        ModelConfig.from_dict(config["model"])
    except (UserError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid model config ({exc})") from None
    return config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a checkpoint directory and return the model (eval mode, weights cast to `dtype`).

    The checkpoint's config.json is attached as `model.checkpoint_config`; `load_tokenizer(path)` reads the tokenizer.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from meshprobe.model import build_model

    path = Path(path)
    config = read_checkpoint_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: truncated or corrupt ({str(exc).splitlines()[0]})") from None
    model = build_model(ModelConfig.from_dict(config["model"]), device="meta")
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
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    model.reset_rotary()
    model.checkpoint_config = config
    return model.eval()
