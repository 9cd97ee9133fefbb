"""A transformers model directory checked without torch or transformers, before anything of it loads.

What a damaged or mismatched directory would otherwise turn into a long traceback (or an allocation of many GB)
deep inside transformers is refused here in one line naming the file: config.json that is not a JSON object
or has loop counts outside 1..MAX_LAYERS (the bound meshprobe's own checkpoints have); weights that are not
safetensors, a safetensors file that is truncated or not one at all (its header is read with plain Python and
every tensor's byte range checked against its dtype and shape, as safetensors itself does), an index naming
shards that are missing or do not hold the tensors it says; an embedding whose width is not the config's
hidden size; weights too large for this machine's memory; a directory without a tokenizer when no token file is
given. A model type the installed transformers does not build is recognised from transformers' own source
files, read as text (importing transformers loads torch). What only the model classes know is checked by
:func:`meshprobe.hf.loader.load` before the weights load: the size of the model config.json describes (built on
the meta device) and every tensor's shape against it (one line naming the first that differs).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from meshprobe import _io
from meshprobe.checks import check_fits
from meshprobe.config import MAX_DEPTH, MAX_LAYERS, MAX_SIZES
from meshprobe.errors import UserError

__all__ = ["CTX_FIELDS", "INDEX_FILE", "TOKENIZER_FILES", "WEIGHTS_FILE", "check_hf_dir", "check_loop_counts",
           "known_model_type", "read_safetensors_header", "weight_tensors"]

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"  # what transformers reads, in order
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_QUOTED = re.compile(r'"([^"\n]*)"|\'([^\'\n]*)\'')
LOAD_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")
SIZE_FIELDS = ("vocab_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
CTX_FIELDS = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len", "seq_length")
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                   "backbone.embeddings.weight")


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path}: truncated or corrupt ({why})")


def _read_head(path: Path) -> tuple[int, bytes, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise _corrupt(path, f"a header of {n} bytes in a file of {size}")
            return n, f.read(n), size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _entry(path: Path, name: str, t) -> tuple[str, list[int], int, int]:
    ok = isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
    offsets = t.get("data_offsets") if ok else None
    ok = ok and isinstance(offsets, list) and len(offsets) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*t["shape"], *offsets])
    if not ok or offsets[0] > offsets[1]:
        raise _corrupt(path, f"tensor {name!r}: no valid dtype, shape and data_offsets")
    width = DTYPE_BYTES.get(t["dtype"])
    if width is not None and math.prod(t["shape"]) * width != offsets[1] - offsets[0]:
        raise _corrupt(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {t['shape']} of {t['dtype']}")
    return t["dtype"], t["shape"], offsets[0], offsets[1]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (dtype, shape)}`` of a safetensors file, from its header alone (no tensor is read): the
    header's length and JSON, each tensor's byte range against its dtype and shape, and the ranges against the
    file (back to back, covering it exactly, as safetensors requires). One-line UserError naming the file."""
    path = Path(path)
    n, raw, size = _read_head(path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    out, ranges = {}, []
    for name, t in header.items():
        if name != "__metadata__":
            dtype, shape, start, end = _entry(path, name, t)
            out[name] = (dtype, shape)
            ranges.append((start, end))
    covered = 0
    for start, end in sorted(ranges):
        if start != covered:
            raise _corrupt(path, f"tensor data overlaps or leaves a gap at byte {covered}")
        covered = end
    if 8 + n + covered != size:
        why = "truncated" if size < 8 + n + covered else "trailing bytes"
        raise _corrupt(path, f"{why}: {size} bytes, its header describes {8 + n + covered}")
    return out


def _no_weights(p: Path) -> UserError:
    pickles = sorted(f.name for f in p.glob("*.bin")) + sorted(f.name for f in p.glob("*.pt"))
    extra = f" (found {', '.join(pickles[:3])}: pickle files are never loaded)" if pickles else ""
    return UserError(f"{p}: no .safetensors weights ({WEIGHTS_FILE} or {INDEX_FILE}){extra}")


def _shards(p: Path) -> dict[str, str]:
    index = p / INDEX_FILE
    data = _io.read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: no weight_map of tensor names to shard files")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise UserError(f"{index}: shard {name!r} is not a .safetensors file in the directory")
    missing = [n for n in names if not (p / n).is_file()]
    if missing:
        raise UserError(f"{index}: shard {missing[0]} is missing ({len(missing)} of {len(names)} shards)")
    return weight_map


def weight_tensors(path: str | os.PathLike) -> dict[str, tuple[str, list[int], Path]]:
    """``{tensor name: (dtype, shape, file)}`` of the directory's safetensors weights (``model.safetensors``,
    else the shards of ``model.safetensors.index.json``), every file's header checked
    (:func:`read_safetensors_header`) and every tensor of the index found in its shard."""
    p = Path(path)
    if (p / WEIGHTS_FILE).is_file():
        return {k: (*v, p / WEIGHTS_FILE) for k, v in read_safetensors_header(p / WEIGHTS_FILE).items()}
    if not (p / INDEX_FILE).is_file():
        raise _no_weights(p)
    weight_map = _shards(p)
    out = {}
    for shard in sorted(set(weight_map.values())):
        out.update({k: (*v, p / shard) for k, v in read_safetensors_header(p / shard).items()})
    absent = [k for k, shard in weight_map.items() if k not in out or out[k][2].name != shard]
    if absent:
        raise UserError(f"{p / INDEX_FILE}: tensor {absent[0]!r} is not in its shard {weight_map[absent[0]]} "
                        f"({len(absent)} such)")
    return out


@lru_cache(maxsize=1)
def _transformers_strings() -> frozenset[str] | None:
    """Every quoted string in transformers' model-type tables (auto_mappings.py, configuration_auto.py), read as
    text; None when they cannot be found (then only an import of transformers can tell)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    auto = Path(list(spec.submodule_search_locations)[0]) / "models" / "auto"
    strings: set[str] = set()
    for name in ("auto_mappings.py", "configuration_auto.py"):
        try:
            text = (auto / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        strings.update(a or b for a, b in _QUOTED.findall(text))
    return frozenset(strings) if len(strings) > 100 else None


def known_model_type(model_type: str) -> bool | None:
    """False when the installed transformers certainly does not build ``model_type`` (it appears nowhere in its
    model-type tables); None when it may (then transformers itself decides:
    :func:`~meshprobe.hf.loader.remote_code_reason`)."""
    strings = _transformers_strings()
    return None if strings is None or model_type in strings else False


def _int_field(config: dict, name: str) -> int | None:
    v = config.get(name)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def check_loop_counts(p: Path, config: dict[str, Any], fields: tuple[str | None, str | None],
                      loops: int | None = None) -> int | None:
    """The loop counts a model will run, bounded like meshprobe's checkpoints (1..MAX_LAYERS steps, at most
    MAX_DEPTH loop-body calls with nested steps): the config's step fields (when present) and ``loops``.
    Returns the number of (outer) steps when known."""
    if loops is not None and (not isinstance(loops, int) or isinstance(loops, bool) or not 1 <= loops <= MAX_LAYERS):
        raise UserError(f"loops={loops}: give 1 to {MAX_LAYERS} loop steps (the bound of meshprobe's checkpoints)")
    counts = []
    for field in fields:
        if field is None or field not in config:
            counts.append(None)
            continue
        v = _int_field(config, field)
        if v is None or not 1 <= v <= MAX_LAYERS:
            raise UserError(f"{p / 'config.json'}: {field} must be a loop count from 1 to {MAX_LAYERS}, "
                            f"got {config[field]!r}")
        counts.append(v)
    outer = loops if loops is not None else counts[0]
    if outer is not None and counts[1] is not None and outer * (counts[1] + 1) > MAX_DEPTH:
        raise UserError(f"{p}: {outer} loop steps of {counts[1]} inner steps each are more than {MAX_DEPTH} calls")
    return outer


def _check_sizes(p: Path, config: dict[str, Any], tensors: dict, dtype: str | None, fits: bool = True) -> None:
    """The embedding's width against the config's hidden size, the sizes against meshprobe's bounds, the
    weights against this machine's memory (in the dtype they load in; unless ``fits`` is False)."""
    for name in (*HIDDEN_FIELDS, *SIZE_FIELDS, *CTX_FIELDS):  # what transformers would refuse after seconds
        v = config.get(name)
        if v is not None and (_int_field(config, name) is None or v < 1):
            raise UserError(f"{p / 'config.json'}: {name} must be a positive integer, got {v!r}")
    field = next((f for f in HIDDEN_FIELDS if _int_field(config, f) is not None), None)
    emb = next(((k, v) for k, v in sorted(tensors.items()) if k.endswith(EMBEDDING_NAMES) and len(v[1]) == 2), None)
    if field is not None and emb is not None and emb[1][1][1] != config[field]:
        raise UserError(f"{emb[1][2]}: {emb[0]} has shape {emb[1][1]}, but config.json has {field} = {config[field]}")
    for name, limit in ((field, MAX_SIZES["d_model"]), ("vocab_size", MAX_SIZES["vocab_size"])):
        v = _int_field(config, name) if name else None
        if v is not None and not 1 <= v <= limit:
            raise UserError(f"{p / 'config.json'}: {name} = {v} is outside the supported 1..{limit}")
    n = sum(math.prod(shape) for _, shape, _ in tensors.values())
    width = LOAD_BYTES.get(str(dtype).removeprefix("torch.")) if dtype is not None else None
    n_bytes = sum(math.prod(shape) * (width or DTYPE_BYTES.get(dt, 1)) for dt, shape, _ in tensors.values())
    if fits:
        check_fits(n_bytes, f"the weights of {p} ({n:,} parameters)")


def check_hf_dir(path: str | os.PathLike, *, spec=None, loops: int | None = None, trust_remote_code: bool = False,
                 tokens: bool = True, dtype=None, batch_size: int | None = None, seq_len: int | None = None,
                 spread: bool = False) -> dict[str, Any]:
    """Check a transformers model directory before anything of it loads (see the module docstring); returns
    its config.json. ``spec``: the loop spec it will run with (default: the built-in one of its architecture),
    ``loops``: the test-time depth, ``tokens``: whether a token file is given (else it needs a tokenizer),
    ``dtype``: what the weights load as; ``batch_size`` and ``seq_len`` (both given): the states of one batch
    must fit in memory; ``spread``: the model loads with a device_map (GPUs, CPU, disk), so its weights need not
    fit in this machine's memory. Messages name these parameters."""
    from meshprobe.hf.loader import read_hf_config, remote_code_reason, tokenizer_remote_reason
    from meshprobe.hf.spec import as_spec, step_fields

    p = Path(path)
    config = read_hf_config(p)
    reason = remote_code_reason(config, heavy=False) or (None if tokens else tokenizer_remote_reason(p))
    if reason and not trust_remote_code:
        raise UserError(f"{p}: {reason}; it runs only with trust_remote_code=True")
    _check_sizes(p, config, weight_tensors(p), dtype, fits=not spread)
    if spec is not None:
        spec = as_spec(spec)
        fields = (spec.steps_field, spec.inner_steps_field)
    else:
        fields = next((step_fields(a) for a in config.get("architectures") or [] if isinstance(a, str)), (None, None))
    steps = check_loop_counts(p, config, fields, loops)
    d = next((_int_field(config, f) for f in HIDDEN_FIELDS if _int_field(config, f) is not None), None)
    ctx = next((_int_field(config, f) for f in CTX_FIELDS if _int_field(config, f)), None)
    seq_len = min(seq_len, ctx) if seq_len and ctx else seq_len  # windows are at most the context
    if steps and d and batch_size and seq_len:  # the cached states of one batch (float32), a lower estimate
        check_fits(4 * batch_size * seq_len * d * (steps + 3),
                   f"loops={steps}: the {steps + 3} states of a batch of {batch_size} x {seq_len} tokens (batch_size)")
    if not tokens and not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{p} has no tokenizer ({', '.join(TOKENIZER_FILES)}): give pre-tokenized sequences, "
                        "tokens=FILE.npy")
    return config
