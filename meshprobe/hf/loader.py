"""Load a transformers model directory and wrap it; refuse remote code unless asked for.

A directory is a transformers model directory when its config.json has ``model_type`` or ``architectures`` and
no meshprobe ``model`` section (:func:`is_hf_dir`). Its config maps to remote code when it has ``auto_map`` or
names a model type or architecture the installed transformers does not build; such a directory loads only with
``trust_remote_code=True``, and without it no file of the directory is imported. Weights load from safetensors
only (``use_safetensors=True``); a pickle file is never read. Everything is local (``local_files_only``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from meshprobe import _io
from meshprobe.errors import UserError

__all__ = ["is_hf_dir", "load", "load_tokenizer", "read_hf_config", "remote_code_reason", "tokenizer_remote_reason"]

_DTYPES = ("float32", "float16", "bfloat16")


def _config_path(path) -> Path:
    return Path(path) / "config.json"


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose config.json looks like a transformers config (``model_type`` or
    ``architectures``, no meshprobe ``model`` section)."""
    p = _config_path(path)
    if not p.is_file():
        return False
    try:
        config = _io.read_json(p)
    except UserError:  # unreadable, not JSON, nested too deeply: not a transformers directory
        return False
    return isinstance(config, dict) and "model" not in config and bool(
        config.get("model_type") or config.get("architectures"))


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a transformers model directory as a dict (UserError when it is not one)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model directory not found: {p}")
    if not is_hf_dir(p):
        raise UserError(f"{p}: no transformers config.json (with model_type or architectures)")
    return _io.read_json(_config_path(p))


def remote_code_reason(config: dict[str, Any]) -> str | None:
    """Why a config needs remote code (``auto_map``, or a model type / architecture the installed transformers
    does not build), or None."""
    if config.get("auto_map"):
        return "its config maps to remote code (auto_map)"
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type and model_type not in CONFIG_MAPPING_NAMES:
        return f"model_type {model_type!r} is not built by the installed transformers {transformers.__version__}"
    for arch in config.get("architectures") or []:
        if not hasattr(transformers, str(arch)):
            return f"architecture {arch!r} is not in the installed transformers {transformers.__version__}"
    return None


def _check_weights(p: Path) -> None:
    if not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.glob("*.bin")) + sorted(f.name for f in p.glob("*.pt"))
        extra = f" (found {', '.join(pickles[:3])}: pickle files are never loaded)" if pickles else ""
        raise UserError(f"{p}: no .safetensors weights{extra}")


def _dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in _DTYPES:
        raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load(path: str | os.PathLike, spec=None, trust_remote_code: bool = False, dtype=None, device=None,
         loops: int | None = None):
    """Load the transformers model in ``path`` and :func:`~meshprobe.hf.hooked.wrap` it.

    ``spec``: a loop spec (LoopSpec, dict or JSON file; default: the built-in spec of the architecture).
    ``trust_remote_code``: allow the directory's own modeling code (refused otherwise, before anything of it is
    imported). ``dtype``: "float32" / "float16" / "bfloat16" / a torch dtype (default: the checkpoint's own).
    ``device``: where to put the model (default: CPU). ``loops``: test-time depth (see ``wrap``).
    """
    from meshprobe.hf.spec import as_spec

    p = Path(path)
    config = read_hf_config(p)
    reason = remote_code_reason(config)
    if reason and not trust_remote_code:
        raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
    _check_weights(p)
    spec = as_spec(spec) if spec is not None else None  # a bad spec fails before the weights load
    torch_dtype = _dtype(dtype)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(p, trust_remote_code=bool(trust_remote_code),
                                                     use_safetensors=True, local_files_only=True, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"{p}: transformers could not load the model ({str(exc).splitlines()[0]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    from meshprobe.hf.hooked import wrap

    wrapped = wrap(model, spec, loops)
    wrapped.checkpoint_dir, wrapped.trust_remote_code = p, bool(trust_remote_code)  # for its tokenizer
    return wrapped


def tokenizer_remote_reason(path: str | os.PathLike) -> str | None:
    """Why the directory's tokenizer needs remote code (``auto_map`` in tokenizer_config.json), or None."""
    f = Path(path) / "tokenizer_config.json"
    if not f.is_file():
        return None
    config = _io.read_json(f)
    if not isinstance(config, dict):
        raise UserError(f"{f}: not a JSON object")
    mapped = config.get("auto_map")
    return "its tokenizer maps to remote code (auto_map in tokenizer_config.json)" if mapped else None


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The model directory's own tokenizer (``AutoTokenizer``, local files only), or None if it has none."""
    p = Path(path)
    reason = remote_code_reason(read_hf_config(p))
    if reason and not trust_remote_code:
        raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    reason = tokenizer_remote_reason(p)
    if reason and not trust_remote_code:
        raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=bool(trust_remote_code), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"{p}: its tokenizer does not load ({str(exc).splitlines()[0]})") from None
