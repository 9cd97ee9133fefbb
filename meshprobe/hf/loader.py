"""Load a transformers model directory and wrap it; refuse remote code unless asked for.

A directory is a transformers model directory when its config.json has ``model_type`` or ``architectures`` and
no meshprobe ``model`` section (:func:`is_hf_dir`). Its config maps to remote code when it has ``auto_map`` or
names a model type or architecture the installed transformers does not build; such a directory loads only with
``trust_remote_code=True``, and without it no file of the directory is imported. Weights load from safetensors
only (``use_safetensors=True``); a pickle file is never read. Everything is local (``local_files_only``).

Before anything loads, the directory is checked without torch (:mod:`meshprobe.hf.checks`); then the model
config.json describes is built on the meta device (its size against memory) and transformers' load report is
held back, so weights of other shapes are one line naming the first tensor. With ``trust_remote_code``, an
exception inside the directory's own code is one line naming the file and line (:func:`remote_code_error`).
"""
from __future__ import annotations

import logging
import os
import re
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshprobe import _io
from meshprobe.errors import UserError

__all__ = ["is_hf_dir", "load", "load_tokenizer", "read_hf_config", "remote_code_error", "remote_code_reason",
           "tokenizer_remote_reason"]

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


def remote_code_reason(config: dict[str, Any], heavy: bool = True) -> str | None:
    """Why a config needs remote code (``auto_map``, or a model type / architecture the installed transformers
    does not build), or None. ``heavy=False``: only what is known without importing transformers (which loads
    torch): ``auto_map``, and a model type absent from transformers' source (:func:`~meshprobe.hf.checks.
    known_model_type`)."""
    from meshprobe.hf.checks import known_model_type

    if config.get("auto_map"):
        return "its config maps to remote code (auto_map)"
    model_type = config.get("model_type")
    if model_type and known_model_type(str(model_type)) is False:
        return f"model_type {model_type!r} is not built by the installed transformers"
    if not heavy:
        return None
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type and model_type not in CONFIG_MAPPING_NAMES:
        return f"model_type {model_type!r} is not built by the installed transformers {transformers.__version__}"
    for arch in config.get("architectures") or []:
        if not hasattr(transformers, str(arch)):
            return f"architecture {arch!r} is not in the installed transformers {transformers.__version__}"
    return None


def _dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in _DTYPES:
        raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _is_remote_file(filename: str, dirs) -> bool:
    """A source file of a directory's own code: in it, or transformers' copy of it (``transformers_modules``)."""
    f = Path(filename)
    return "transformers_modules" in f.parts or any(Path(os.path.realpath(d)) in Path(os.path.realpath(f)).parents
                                                   for d in dirs)


def remote_code_error(exc: BaseException, dirs) -> UserError | None:
    """A one-line UserError for an exception raised inside a model directory's own (trusted) code, naming the
    file, the line and the error; None when no frame of the traceback is in such a file."""
    dirs = [Path(d) for d in dirs]
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    if isinstance(exc, SyntaxError) and exc.filename:
        frames.append((exc.filename, exc.lineno))
    frames = [(f, n) for f, n in frames if _is_remote_file(f, dirs)]
    if not frames:
        return None
    filename, line = frames[-1]
    where = next((d for d in dirs if d.resolve().name in Path(filename).parts), dirs[0] if dirs else None)
    message = (str(exc).strip().splitlines() or [""])[0]
    return UserError(f"{where}: its own code {Path(filename).name} (line {line}) raised "
                     f"{type(exc).__name__}{': ' + message if message else ''}")


def _loading_error(p: Path, exc: Exception, what: str) -> UserError | None:
    """The one line for an exception of transformers while it builds or loads the model in ``p``."""
    remote = remote_code_error(exc, [p])
    if remote is not None:
        return remote
    if isinstance(exc, (OSError, ValueError, ImportError, RuntimeError)):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return UserError(f"{p}: transformers could not {what} ({first})")
    return None


def _check_size(p: Path, trust_remote_code: bool, dtype) -> None:
    """Build the model config.json describes on the meta device (no memory; config validation and trusted code
    run) and refuse it, before from_pretrained allocates, when its parameters do not fit in this machine's memory.
    A model whose code cannot be built on the meta device is left to from_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from meshprobe.checks import check_fits

    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # whatever the config class raises (a validation error), config.json is at fault
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise remote_code_error(exc, [p]) or UserError(f"{p / 'config.json'}: transformers refuses it ({message})"
                                                       ) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # code that cannot run on the meta device: from_pretrained reports what is really wrong
        return
    width = dtype.itemsize if isinstance(dtype, torch.dtype) else 2  # "auto": at least 2 bytes a parameter
    n = sum(t.numel() for t in model.state_dict().values())
    check_fits(n * width, f"the model config.json describes in {p} ({n:,} parameters)")


_MISMATCH = re.compile(r"^(\S.*?)\s*\|\s*MISMATCH\b.*?ckpt:\s*torch\.Size\((\[[^]]*\])\)\s*vs\s*model:\s*"
                       r"torch\.Size\((\[[^]]*\])\)", re.M)


@contextmanager
def _held_load_report():
    """transformers' load report (a multi-line warning), held back while from_pretrained runs: shown after a
    success, read for the first mismatched tensor after a failure (which is then one line)."""
    logs = [logging.getLogger(name) for name in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    held: list[logging.LogRecord] = []

    def hold(record):
        held.append(record)
        return False

    for log in logs:
        log.addFilter(hold)
    try:
        yield held
    finally:
        for log in logs:
            log.removeFilter(hold)


def _from_pretrained(p: Path, trust_remote_code: bool, dtype, **big):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _held_load_report() as held:
            model = AutoModelForCausalLM.from_pretrained(p, trust_remote_code=trust_remote_code, use_safetensors=True,
                                                         local_files_only=True, dtype=dtype, **big)
    except Exception as exc:
        found = sorted((m for r in held for m in _MISMATCH.finditer(r.getMessage())), key=lambda m: m.group(1))
        if found:
            key, have, want = found[0].groups()
            raise UserError(f"{p}: the weights do not match config.json ({key} has shape {have} in the safetensors "
                            f"files, config.json makes {want}; {len(found)} such)") from None
        err = _loading_error(p, exc, "load the model")
        if err is None:
            raise
        raise err from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for record in held:  # a success: the report (missing or unexpected keys) as transformers shows it
        logging.getLogger(record.name).handle(record)
    return model


def load(path: str | os.PathLike, spec=None, trust_remote_code: bool = False, dtype=None, device=None,
         loops: int | None = None, device_map=None, max_memory: dict | None = None,
         offload_folder: str | os.PathLike | None = None):
    """Load the transformers model in ``path`` and :func:`~meshprobe.hf.hooked.wrap` it.

    ``spec``: a loop spec (LoopSpec, dict or JSON file; default: the built-in spec of the architecture).
    ``trust_remote_code``: allow the directory's own modeling code (refused otherwise, before anything of it is
    imported). ``dtype``: "float32" / "float16" / "bfloat16" / a torch dtype (default: the checkpoint's own).
    ``device``: where to put the model (default: CPU). ``loops``: test-time depth (see ``wrap``).
    The directory is checked before anything loads (:func:`~meshprobe.hf.checks.check_hf_dir`: config, loop
    counts, safetensors headers, sizes), then the size of the model config.json describes; weights whose
    shapes differ from that model are one line naming the first tensor.
    ``device_map``: ``"auto"`` (or a transformers device map) spreads a model that does not fit one device over
    the GPUs, the CPU and ``offload_folder`` on disk (accelerate's big-model inference, bounded per device by
    ``max_memory``, e.g. ``{0: "20GiB", "cpu": "60GiB"}``; no check that it fits this machine's memory then);
    the loop hooks fire as on a model in memory.
    """
    from meshprobe.hf.checks import check_hf_dir
    from meshprobe.hf.spec import as_spec

    p = Path(path)
    if dtype is not None and not hasattr(dtype, "is_floating_point") and dtype not in _DTYPES:
        raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    big = _big_model_kwargs(device, device_map, max_memory, offload_folder)
    config = check_hf_dir(p, spec=spec, loops=loops, trust_remote_code=trust_remote_code, dtype=dtype,
                          spread=bool(big))
    reason = remote_code_reason(config)
    if reason and not trust_remote_code:
        raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
    spec = as_spec(spec) if spec is not None else None  # a bad spec fails before the weights load
    torch_dtype = _dtype(dtype)
    if not big:  # a spread model is meant not to fit one device
        _check_size(p, bool(trust_remote_code), torch_dtype)
    model = _from_pretrained(p, bool(trust_remote_code), torch_dtype, **big)
    if device is not None:
        model = model.to(device)
    from meshprobe.hf.hooked import wrap

    wrapped = wrap(model, spec, loops)
    wrapped.checkpoint_dir, wrapped.trust_remote_code = p, bool(trust_remote_code)  # for its tokenizer
    return wrapped


def _big_model_kwargs(device, device_map, max_memory, offload_folder) -> dict:
    """from_pretrained's keywords of accelerate's big-model inference (none without a device_map)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UserError("max_memory and offload_folder need device_map (e.g. device_map='auto')")
        return {}
    if device is not None:
        raise UserError("give device or device_map, not both")
    out = {"device_map": device_map, "max_memory": max_memory}
    if offload_folder is not None:
        out["offload_folder"] = str(offload_folder)
    return out


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
    except Exception as exc:
        plain = isinstance(exc, (OSError, ValueError))
        err = remote_code_error(exc, [p]) or (
            UserError(f"{p}: its tokenizer does not load ({str(exc).splitlines()[0]})") if plain else None)
        if err is None:
            raise
        raise err from None
