"""Training presets and ``--key value`` overrides: TOML files typed against ModelConfig and TrainConfig.

    model_cfg, train_cfg = load_config("tiny", ["--variant", "mesh", "--steps", "200"])

Presets are package data (``meshprobe/configs/presets/*.toml``, so ``--config tiny`` works from an installed
wheel): a ``[model]`` table (ModelConfig fields), a ``[train]`` table (TrainConfig fields) and an optional
top-level ``description``. Zoo specs live apart, in ``meshprobe/configs/zoo/`` (:mod:`meshprobe.paper.zoo`).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from meshprobe.config import ModelConfig
from meshprobe.errors import UserError
from meshprobe.training.config import TrainConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"


def list_presets() -> list[str]:
    """Names of the bundled training presets (the files in meshprobe/configs/presets/)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_preset(name_or_path: str) -> Path:
    """A preset name ("tiny") or a path to a TOML file -> the TOML path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if "/" not in text and not text.endswith(".toml") and (PRESET_DIR / f"{text}.toml").is_file():
        return PRESET_DIR / f"{text}.toml"
    if path.exists():
        raise UserError(f"config {text!r} is not a file")
    raise UserError(f"unknown preset or config file {text!r}; presets: {', '.join(list_presets())} "
                    "(or give a path to a .toml file)")


def model_fields() -> dict[str, Any]:
    return typing.get_type_hints(ModelConfig)


def train_fields() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _field_table() -> dict[str, tuple[str, Any]]:
    """key -> (section, type) over both sections; names are unique across sections."""
    table: dict[str, tuple[str, Any]] = {}
    mf = {f.name for f in dataclasses.fields(ModelConfig)}
    tf = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not (mf & tf), f"model and train config share field names {mf & tf}"
    hints_m, hints_t = model_fields(), train_fields()
    for name in sorted(mf):
        table[name] = ("model", hints_m[name])
    for name in sorted(tf):
        table[name] = ("train", hints_t[name])
    return table


def _valid_keys_message() -> str:
    return (f"model keys: {', '.join(f.name for f in dataclasses.fields(ModelConfig))}; "
            f"train keys: {', '.join(f.name for f in dataclasses.fields(TrainConfig))}")


def _type_parts(tp) -> tuple[list, bool]:
    """(non-None member types, None allowed) of a type hint."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _parse_bool(text: str, key: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise UserError(f"--{key}: expected true or false, got {text!r}")


def _parse_scalar(text: str, tp, key: str):
    try:
        if tp is bool:
            return _parse_bool(text, key)
        if tp is int:
            try:
                return int(text)
            except ValueError:
                value = float(text)  # accept 1e6 for integers
                if not value.is_integer():
                    raise
                return int(value)
        if tp is float:
            return float(text)
    except ValueError:
        raise UserError(f"--{key}: expected {'an integer' if tp is int else 'a number'}, got {text!r}") from None
    return text


def convert_value(key: str, values: list[str] | bool, tp) -> Any:
    """Convert command-line strings to a field's type. `values` is True for a bare flag (``--compile``)."""
    members, none_ok = _type_parts(tp)
    if values is True:
        if bool in members:
            return True
        raise UserError(f"--{key} needs a value")
    if len(values) == 1 and none_ok and values[0].strip().lower() in ("none", "null"):
        return None
    if any(typing.get_origin(m) is list for m in members):  # data: str | list[str]
        return values[0] if len(values) == 1 else list(values)
    if any(typing.get_origin(m) is tuple for m in members):  # betas
        parts = [p for v in values for p in v.replace(",", " ").split()]
        (tuple_tp,) = [m for m in members if typing.get_origin(m) is tuple]
        item_tp = typing.get_args(tuple_tp)[0]
        return tuple(_parse_scalar(p, item_tp, key) for p in parts)
    if len(values) != 1:
        raise UserError(f"--{key} takes one value, got {len(values)}: {' '.join(values)}")
    return _parse_scalar(values[0], members[0], key)


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--variant", "mesh", "--lr=1e-3", "--compile"]`` -> {"variant": "mesh", "lr": 0.001, "compile": True}.

    Keys are ModelConfig or TrainConfig field names (dashes allowed for underscores); values are converted by
    the field's type ("none" for optional fields, several values for ``--data a.txt b.txt``, ``0.9,0.95`` for
    betas). An unknown key raises UserError naming the valid keys.
    """
    table = _field_table()
    out: dict[str, Any] = {}
    i, args = 0, list(args)
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument {token!r}: overrides are written --key value")
        key, eq, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if key not in table:
            raise UserError(f"unknown option --{key}; {_valid_keys_message()}")
        if eq:
            values: list[str] | bool = [inline]
            i += 1
        else:
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            values = args[i + 1:j] or True
            i = j
        out[key] = convert_value(key, values, table[key][1])
    return out


def _check_toml_value(section: str, key: str, value, tp):
    members, none_ok = _type_parts(tp)
    ok = False
    for m in members:
        origin = typing.get_origin(m)
        if m is bool:
            ok |= isinstance(value, bool)
        elif m is int:
            ok |= isinstance(value, int) and not isinstance(value, bool)
        elif m is float:
            ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
        elif m is str:
            ok |= isinstance(value, (str, int)) and not isinstance(value, bool)  # layout = 8 is fine
        elif origin in (list, tuple):
            ok |= isinstance(value, list)
    if not ok:
        raise UserError(f"[{section}] {key} = {value!r} has the wrong type (expected {tp})")
    if tp is float or (float in members and int not in members):
        value = float(value)
    return value


def _read_preset(config: str | os.PathLike) -> tuple[dict, dict]:
    """(model dict, train dict) of a preset name or TOML path, every key checked and typed."""
    path = resolve_preset(os.fspath(config))
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    extra = sorted(set(doc) - {"model", "train", "description"})
    if extra:
        hint = " (this looks like a zoo spec: use meshprobe zoo)" if "run" in doc else ""
        raise UserError(f"{path}: unknown table(s) or key(s) {extra}; a preset has [model] and [train]{hint}")
    table = _field_table()
    model_d, train_d = dict(doc.get("model", {})), dict(doc.get("train", {}))
    for section, d in (("model", model_d), ("train", train_d)):
        for key in list(d):
            if key not in table or table[key][0] != section:
                raise UserError(f"{path}: unknown key {key!r} in [{section}]; {_valid_keys_message()}")
            d[key] = _check_toml_value(section, key, d[key], table[key][1])
    return model_d, train_d


def _typed_overrides(overrides: dict) -> dict[str, Any]:
    """Programmatic overrides (e.g. the zoo's): TOML-typed values, or strings parsed like the command line."""
    table = _field_table()
    out = {}
    for key, value in overrides.items():
        key = str(key).replace("-", "_")
        if key not in table:
            raise UserError(f"unknown option --{key}; {_valid_keys_message()}")
        tp = table[key][1]
        if value is None:
            if not _type_parts(tp)[1]:
                raise UserError(f"{key} cannot be none")
        elif isinstance(value, str) and str not in _type_parts(tp)[0]:
            value = convert_value(key, [value], tp)
        else:
            value = _check_toml_value(table[key][0], key, value, tp)
        out[key] = value
    return out


def load_config(config: str | os.PathLike | None = None, overrides: Sequence[str] | dict | None = None,
                base: tuple[dict, dict] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Build (ModelConfig, TrainConfig) from a preset name or TOML path plus overrides.

    The TOML has a ``[model]`` table (ModelConfig fields) and a ``[train]`` table (TrainConfig fields), and
    optionally a top-level ``description`` string. `base` = (model dict, train dict) replaces the TOML (used by
    ``--resume`` without ``--config``). `overrides` is a list of ``--key value`` strings or a dict.
    A ``steps`` override clears the preset's ``tokens`` and vice versa.
    Raises UserError for an unknown preset, section or key, or a bad value.
    """
    if base is not None:
        model_d, train_d = dict(base[0]), dict(base[1])
    elif config is None:
        model_d, train_d = {}, {}
    else:
        model_d, train_d = _read_preset(config)
    if overrides:
        table = _field_table()
        ov = _typed_overrides(overrides) if isinstance(overrides, dict) else parse_overrides(overrides)
        for key, value in ov.items():
            (model_d if table[key][0] == "model" else train_d)[key] = value
            if key == "steps" and "tokens" not in ov:
                train_d.pop("tokens", None)
            if key == "tokens" and "steps" not in ov:
                train_d.pop("steps", None)
    try:
        model_cfg = ModelConfig.from_dict(model_d)
        train_cfg = TrainConfig.from_dict(train_d)
    except TypeError as exc:
        raise UserError(f"bad config: {exc}") from None
    return model_cfg, train_cfg
