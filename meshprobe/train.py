"""Training: the Pythia recipe for vanilla, recursive and MeSH models, with exact resume and multi-GPU (DDP).

    from meshprobe.train import load_config, train
    model_cfg, train_cfg = load_config("tiny", ["--variant", "mesh", "--steps", "200"])
    summary = train(model_cfg, train_cfg, "checkpoints/tiny-mesh")

Recipe (paper §4)
-----------------
AdamW (beta1 0.9, beta2 0.95, eps 1e-8), weight decay 0.01, cosine schedule with 1% linear warm-up decaying to
10% of the peak learning rate, gradient clipping at global norm 1.0; bf16 autocast on CUDA, fp32 on CPU;
optional ``torch.compile``. Choices the paper leaves open:

* Weight decay applies to every parameter with two or more dimensions (all linear weight matrices including
  the MeSH routers, the token embedding and the unembedding); biases, LayerNorm gains/biases and the
  ``static_comb`` scalars are not decayed.
* Schedule (:func:`lr_at`), a pure function of the step: ``warmup = ceil(warmup_frac * total)`` steps rise
  linearly ``lr * (step + 1) / warmup``; then a half cosine goes from ``lr`` at the first decay step to exactly
  ``min_lr_frac * lr`` at the last step. The total is always the run's full length (``steps`` or
  ``ceil(tokens / (batch_size * seq_len))``), never the point where a run stops, so an interrupted run resumes
  on the same curve.
* Loss: mean next-token cross-entropy over all ``batch_size * seq_len`` predictions of the step (computed in
  fp32 from the logits).

Data
----
Batches come from :func:`meshprobe.data.get_batch`: the global batch at step ``s`` is a pure function of
``(seed, s)``, so the data position of a checkpoint is just its step, and W processes (rank r takes rows
``[r*B/W, (r+1)*B/W)``) see exactly the batch one process would. The tokenizer is a byte-level BPE trained on
the corpus' train split (``vocab_size`` of the model; cached by corpus fingerprint), or the ``tokenizer`` of
the train config (a ``tokenizer.json`` or a checkpoint directory) so that a family of models shares one.
It is saved into every checkpoint and reused on ``--resume``.

Output directory = checkpoint
-----------------------------
``out_dir`` is itself a checkpoint directory (:mod:`meshprobe.checkpoint`), written atomically at step 0,
every ``save_every`` steps, on Ctrl-C and at the end:

==========================  ================================================================================
``config.json``             model config + ``metadata``: the train config, step, total_steps, tokens_seen,
                            wall_time_s, train_loss, val_loss, val_ppl, device, world_size, data (spec,
                            fingerprint, token counts), status, complete, meshprobe / torch versions
``model.safetensors``       fp32 weights
``tokenizer.json``          the tokenizer
``optimizer.safetensors``   AdamW state tensors, keys ``state.{param index}.{exp_avg|exp_avg_sq|step}``
``rng.safetensors``         torch CPU (and CUDA) generator states as uint8 tensors, numpy's MT19937 key
``training_state.json``     step, param names per index, param_groups, the partial loss-logging window,
                            python/numpy RNG scalars, wall time, last validation figures
``train_log.jsonl``         one JSON object per logged event (below); appended live between checkpoints
==========================  ================================================================================

While training, rank 0 holds an advisory lock ``.NAME.lock`` beside ``out_dir``: a second process training into
the same directory stops with a UserError. Nothing is pickled. On resume the log is cut back to the checkpoint's step, so a resumed run's log equals the
uninterrupted run's (apart from timing fields).

Log records: ``{"type": "train", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}``
every ``log_every`` steps and at the end (``loss`` is the mean over the steps since the previous record; ``lr``
and ``grad_norm`` (before clipping) are the last step's), and ``{"type": "eval", "step", "tokens", "val_loss",
"val_ppl"}`` every ``eval_every`` steps and at the end. ``step`` counts completed optimizer steps.

Stopping
--------
* Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is saved, :func:`train` returns with
  ``status == "interrupted"`` (the CLI exits 130). A second Ctrl-C aborts at once without saving (the last
  checkpoint stays intact: writes are atomic). Under DDP the ranks agree on stopping at the next logging step.
* ``stop_after = N``: train N steps of the full schedule, save, return ``status == "stopped"`` (exit 0); a later
  ``--resume`` continues. Useful for splitting a long run into time slots.
* A NaN/inf loss raises :class:`TrainingDiverged` naming the step; nothing is saved after it, so the last good
  checkpoint stays (the CLI prints one line and exits 1). On CPU every step is checked; on CUDA the check runs
  at logging, evaluation and save steps (to avoid a device sync per step), always before anything is saved.

Multi-GPU
---------
Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`train` initialises the process group (NCCL on
CUDA, gloo on CPU), wraps the model in DistributedDataParallel, and each rank trains on its rows of the global
batch. Only rank 0 prints, logs and writes checkpoints. Logged losses are averaged over ranks.
``micro_batch_size`` splits each rank's rows into gradient-accumulation micro-batches.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import tomllib
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from meshprobe.config import ModelConfig
from meshprobe.errors import UserError

PRESET_DIR = Path(__file__).resolve().parent / "configs"
LOG_FILE = "train_log.jsonl"
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FORMAT = "meshprobe-train-state"
STATE_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16")

# Test hooks (module attributes so tests can monkeypatch them): called after every optimizer step with the
# number of completed steps.
_step_hook = None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. The message names the step; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The ``[train]`` section of a preset. Every field can be overridden on the command line (``--lr 1e-3``).

    data            corpus spec (:mod:`meshprobe.data`): "shakespeare", "mix", a source name, or a list of paths
    seed            seeds the model init and the batch stream (batch at step s = f(seed, s))
    batch_size      GLOBAL batch in sequences (split evenly over processes under torchrun)
    micro_batch_size  sequences per forward/backward on one process (gradient accumulation); None = all of
                    the process' rows at once. Must divide batch_size / world_size.
    seq_len         tokens per sequence (at most the model's n_ctx)
    steps / tokens  run length: optimizer steps, or training tokens (steps = ceil(tokens / (batch * seq_len)));
                    set one (neither: steps = 1000). A command-line override of one clears the other.
    lr              peak learning rate
    warmup_frac     share of the steps with linear warm-up (ceil)
    min_lr_frac     final learning rate as a share of the peak
    weight_decay    AdamW decoupled weight decay on matrices (see the module docstring)
    betas, eps      AdamW moments ("0.9,0.95" on the command line)
    grad_clip       clip the global gradient norm to this (0 = off)
    eval_every      validation every N steps (0 = only at the end); also always at the end
    eval_batches    validation batches per evaluation (0 = no validation at all)
    log_every       a log record (and progress line) every N steps
    save_every      a checkpoint every N steps (0 = only at step 0, on stop and at the end)
    compile         torch.compile the model
    device          "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    precision       "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    tokenizer       reuse this tokenizer (a tokenizer.json or a checkpoint directory) instead of training one
    stop_after      stop after this many steps of the full schedule (checkpoint saved; resume continues).
                    Not carried over by --resume.
    """

    data: str | list[str] = "shakespeare"
    seed: int = 0
    batch_size: int = 32
    micro_batch_size: int | None = None
    seq_len: int = 128
    steps: int | None = None
    tokens: int | None = None
    lr: float = 1e-3
    warmup_frac: float = 0.01
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 0
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"
    tokenizer: str | None = None
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple)):
            self.data = [str(d) for d in self.data]
            if not self.data:
                raise UserError("data is empty: give a corpus name (shakespeare, mix, ...) or paths")
            if len(self.data) == 1:
                self.data = self.data[0]
        elif not isinstance(self.data, str) or not self.data.strip():
            raise UserError(f"data must be a corpus name or a list of paths, got {self.data!r}")
        try:
            self.betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise UserError(f"betas must be two numbers like 0.9,0.95, got {self.betas!r}") from None
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.steps is None and self.tokens is None:
            self.steps = 1000
        if self.steps is not None and self.tokens is not None:
            raise UserError(f"set steps or tokens, not both (steps={self.steps}, tokens={self.tokens})")
        positive = ["batch_size", "seq_len", "log_every"]
        positive += [n for n in ("steps", "tokens", "micro_batch_size", "stop_after") if getattr(self, n) is not None]
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "eval_every", "eval_batches", "save_every"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("lr", "eps"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise UserError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("warmup_frac", "min_lr_frac"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise UserError(f"compile must be true or false, got {self.compile!r}")
        if self.stop_after is not None and self.stop_after > self.total_steps:
            raise UserError(f"stop_after {self.stop_after} is beyond the run's {self.total_steps} steps")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the length the learning-rate schedule is laid over)."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"unknown train config key(s) {unknown}; known keys: {', '.join(known)}")
        return cls(**data)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def lr_at(step: int, total_steps: int, lr: float, warmup_frac: float = 0.01, min_lr_frac: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps`: linear warm-up over
    ceil(warmup_frac * total) steps, then a half cosine from `lr` down to `min_lr_frac * lr` at the last step."""
    warmup = math.ceil(warmup_frac * total_steps) if warmup_frac > 0 else 0
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_steps = total_steps - warmup
    progress = min(1.0, (step - warmup) / max(1, decay_steps - 1))
    min_lr = min_lr_frac * lr
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- presets and overrides -------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the bundled training presets: the meshprobe/configs/*.toml files with a [model] or [train]
    table and nothing else (the folder also holds other TOML files, e.g. zoo specs)."""
    names = []
    for path in sorted(PRESET_DIR.glob("*.toml")):
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        if ({"model", "train"} & set(doc)) and set(doc) <= {"model", "train", "description"}:
            names.append(path.stem)
    return sorted(names)


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


def load_config(config: str | os.PathLike | None = None, overrides: Sequence[str] | dict | None = None,
                base: tuple[dict, dict] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Build (ModelConfig, TrainConfig) from a preset name or TOML path plus overrides.

    The TOML has a ``[model]`` table (ModelConfig fields) and a ``[train]`` table (TrainConfig fields), and
    optionally a top-level ``description`` string. `base` = (model dict, train dict) replaces the TOML (used by
    ``--resume`` without ``--config``). `overrides` is a list of ``--key value`` strings or a dict.
    Raises UserError for an unknown preset, section or key, or a bad value.
    """
    if base is not None:
        model_d, train_d = dict(base[0]), dict(base[1])
    elif config is None:
        model_d, train_d = {}, {}
    else:
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
    if overrides:
        table = _field_table()
        if isinstance(overrides, dict):  # programmatic overrides (e.g. the zoo): TOML-typed values or strings
            ov = {}
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
                ov[key] = value
        else:
            ov = parse_overrides(overrides)
        for key, value in ov.items():
            section = table[key][0]
            (model_d if section == "model" else train_d)[key] = value
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


# ---------------------------------------------------------------------------------------------------------
# Training state (no pickle)
# ---------------------------------------------------------------------------------------------------------
_POLICY_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_state_files(optimizer, param_names: list[str]) -> tuple[bytes, dict]:
    """Flatten an optimizer state dict: tensors -> safetensors bytes (``state.{i}.{key}``), the rest -> JSON."""
    import torch
    from safetensors.torch import save

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"state.{idx}.{key}"] = value
    meta = {"param_names": param_names, "param_groups": sd["param_groups"], "scalars": scalars}
    return save(tensors), meta


def load_optimizer_state(optimizer, tensor_bytes: bytes, meta: dict, param_names: list[str]) -> None:
    from safetensors.torch import load

    if meta["param_names"] != param_names:
        raise UserError("the checkpoint's optimizer state does not match the model's parameters")
    tensors = load(tensor_bytes)
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise UserError("the checkpoint's optimizer has a different number of parameter groups")
    groups = []
    for saved, current in zip(meta["param_groups"], optimizer.param_groups, strict=True):
        g = dict(saved)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        for key in _POLICY_KEYS:  # implementation choices follow this machine, not the saving one
            if key in current:
                g[key] = current[key]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state_files(device) -> tuple[bytes, dict]:
    """RNG states: torch CPU/CUDA generators and numpy's MT19937 key as tensors; python's state as JSON."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save

    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py_version, list(py_state), py_gauss]}
    return save(tensors), meta


def load_rng_state(tensor_bytes: bytes, meta: dict, device) -> None:
    import random

    import numpy as np
    import torch
    from safetensors.torch import load

    tensors = load(tensor_bytes)
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def read_log(path: Path, max_step: int | None = None) -> list[dict]:
    """Records of a train_log.jsonl, keeping those with step <= max_step; stops at a torn last line."""
    records = []
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


def _log_text(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------------------
# Devices, processes, signals
# ---------------------------------------------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
    return (rank, world, local) if world > 1 else (0, 1, 0)


def resolve_device(spec: str, local_rank: int = 0):
    import torch

    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def autocast_for(device, precision: str):
    """bf16 autocast on CUDA ("auto"/"bf16"), on CPU only when asked ("bf16"); otherwise a no-op."""
    import torch

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolved_precision(device, precision: str) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


class _StopRequest:
    """SIGINT/SIGTERM -> finish the step, save, stop. A second SIGINT raises KeyboardInterrupt (no save)."""

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nmeshprobe train: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------------------
def param_groups(model, weight_decay: float) -> tuple[list[str], list[dict]]:
    """AdamW parameter groups: (names in optimizer order, [decayed group, non-decayed group]).

    Decayed: every parameter with >= 2 dimensions (linear weights incl. MeSH routers, embedding, unembedding).
    Not decayed: biases, LayerNorm weights/biases, the static_comb scalars.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    return names, [{"params": [p for _, p in decay], "weight_decay": weight_decay},
                   {"params": [p for _, p in no_decay], "weight_decay": 0.0}]


def compute_loss(model, x, y):
    """Mean next-token cross-entropy (fp32) of model(x) against targets y."""
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def evaluate(model, tokens, batch_size: int, seq_len: int, max_batches: int, device, precision: str = "auto",
             rank: int = 0, world_size: int = 1, chunk: int | None = None) -> tuple[float, int]:
    """(mean loss, tokens) over the first `max_batches` validation batches (:func:`meshprobe.data.eval_batches`).

    The windows evaluated depend only on (batch_size, seq_len, max_batches): under DDP every rank takes a
    contiguous share of each batch's rows (sums all-reduced), and `chunk` caps the rows per forward pass.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from meshprobe import data

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in data.eval_batches(tokens, batch_size, seq_len, max_batches):
            rows = np.array_split(np.arange(len(x)), world_size)[rank]
            step = chunk or max(1, len(rows))
            for a in range(0, len(rows), step):
                xb = torch.from_numpy(x[rows[a:a + step]]).to(device)
                yb = torch.from_numpy(y[rows[a:a + step]]).to(device)
                with autocast_for(device, precision):
                    logits = model(xb)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="sum")
                total[0] += loss.double()
                total[1] += yb.numel()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train(was_training)
    loss_sum, count = total.tolist()
    return (loss_sum / count if count else float("nan")), int(count)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# ---------------------------------------------------------------------------------------------------------
# Output directory checks
# ---------------------------------------------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Validate the output directory before anything is written; return True when resuming an existing run."""
    if resume and overwrite:
        raise UserError("use --resume or --overwrite, not both")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")
    if resume:
        if not _is_checkpoint(out_dir):
            raise UserError(f"cannot resume: {out_dir} is not a meshprobe checkpoint (no config.json)")
        missing = [f for f in (STATE_FILE, OPTIMIZER_FILE, RNG_FILE) if not (out_dir / f).is_file()]
        if missing:
            raise UserError(f"cannot resume: {out_dir} has no training state (missing {', '.join(missing)})")
        return True
    if overwrite:
        if not _is_checkpoint(out_dir) and any(out_dir.iterdir()):
            raise UserError(f"refusing to overwrite {out_dir}: it is not a meshprobe checkpoint and not empty")
        return False
    raise UserError(f"output directory {out_dir} exists; pass --resume to continue it or --overwrite to replace it")


def _describe_diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {b.get(k)!r} in the checkpoint vs {a.get(k)!r}" for k in keys[:4])


# ---------------------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------------------
def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          overwrite: bool = False, *, quiet: bool = False) -> dict:
    """Train a model and write the checkpoint directory `out_dir`; return a summary dict.

    resume: continue the checkpoint in `out_dir` (model, optimizer, RNG states, step, log). When `out_dir` does
        not exist the run starts fresh. The model config must equal the checkpoint's; train settings may
        change (e.g. more `steps`), which changes the schedule from then on.
    overwrite: replace an existing checkpoint in `out_dir` (a non-checkpoint, non-empty directory is refused).
    quiet: no progress output (errors still raise).

    Summary keys: out_dir, status ("completed", "interrupted", "stopped"), step, total_steps, tokens_seen,
    train_loss, val_loss, val_ppl, wall_time_s, tokens_per_s (this invocation), device, world_size.
    Raises UserError for bad input (before anything is written) and TrainingDiverged on a NaN/inf loss.
    """
    out_dir = Path(out_dir)
    rank, world, local_rank = dist_env()
    total_steps = train_cfg.total_steps
    if train_cfg.seq_len > model_cfg.n_ctx:
        raise UserError(f"seq_len {train_cfg.seq_len} is above the model context n_ctx={model_cfg.n_ctx}")
    if train_cfg.batch_size % world:
        raise UserError(f"batch_size {train_cfg.batch_size} does not divide across {world} processes")
    per_rank = train_cfg.batch_size // world
    micro = train_cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"micro_batch_size {micro} does not divide the {per_rank} sequences per process")
    with _out_dir_lock(out_dir, enabled=rank == 0):
        return _train_locked(model_cfg, train_cfg, out_dir, resume, overwrite, quiet, rank, world, local_rank,
                             total_steps, micro)


class _out_dir_lock:
    """An advisory lock ``.NAME.lock`` beside the output directory, so that two processes never train into the
    same checkpoint at once (the second one gets a UserError). Removed again on exit; a no-op without fcntl."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.out_dir = out_dir
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.enabled = enabled
        self.file = None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return self
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            raise UserError(f"{self.out_dir} is being written by another meshprobe train process "
                            f"(lock {self.path})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            self.file.close()  # closing releases the lock


def _train_locked(model_cfg, train_cfg, out_dir, resume, overwrite, quiet, rank, world, local_rank, total_steps,
                  micro) -> dict:
    resuming = check_out_dir(out_dir, resume, overwrite)
    saved_config = None
    if resuming:
        from meshprobe.checkpoint import read_checkpoint_config

        saved_config = read_checkpoint_config(out_dir)
        if saved_config["model"] != model_cfg.to_dict():
            raise UserError(f"cannot resume {out_dir} with a different model config ("
                            f"{_describe_diff(model_cfg.to_dict(), saved_config['model'])})")
        saved_step = int(json.loads((out_dir / STATE_FILE).read_text())["step"])
        if saved_step > total_steps:
            raise UserError(f"cannot resume {out_dir}: it is at step {saved_step}, beyond the run's {total_steps} "
                            "steps (raise --steps)")

    import torch

    device = resolve_device(train_cfg.device, local_rank)
    show = rank == 0 and not quiet
    own_group = False
    # Under torchrun the process group is set up even for one process, so `torchrun --nproc_per_node 1`
    # exercises the DDP + NCCL path on a single GPU.
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    try:
        return _train(model_cfg, train_cfg, out_dir, resuming, saved_config, device, rank, world, micro, show)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _terminal(stream) -> bool:
    """True for a terminal with a known width (a pty of width 0 would get an empty progress bar)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def _say(show: bool, msg: str, bar=None) -> None:
    if not show:
        return
    if bar is not None and not bar.disable:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def _train(model_cfg, train_cfg, out_dir, resuming, saved_config, device, rank, world, micro, show) -> dict:
    import torch

    import meshprobe
    from meshprobe import data
    from meshprobe.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, save_checkpoint
    from meshprobe.model import build_model

    cfg = train_cfg
    total_steps = cfg.total_steps
    precision = resolved_precision(device, cfg.precision)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data and tokenizer (every check happens before anything is written) ---------------------------
    corpus = data.open_corpus(cfg.data, quiet=rank != 0)
    if resuming and (out_dir / TOKENIZER_FILE).is_file():
        tokenizer, tok_source = data.load_tokenizer(out_dir / TOKENIZER_FILE), "checkpoint"
    elif cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"tokenizer not found: {cfg.tokenizer} (give a tokenizer.json or a checkpoint directory)")
        tokenizer, tok_source = data.load_tokenizer(path), str(path)
    else:
        _say(show, f"meshprobe train: tokenizer for {corpus.name} (byte-level BPE, {model_cfg.vocab_size} tokens)")
        tokenizer, tok_source = data.cached_tokenizer(corpus, vocab_size=model_cfg.vocab_size), "trained"
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                        f"vocab_size {model_cfg.vocab_size}")
    tokens = data.tokenize_corpus(corpus, tokenizer)
    train_tokens, val_tokens = tokens["train"], tokens["val"]
    if len(train_tokens) < cfg.seq_len + 1:
        raise UserError(f"data {corpus.name}: {len(train_tokens)} training tokens, need at least seq_len + 1 = "
                        f"{cfg.seq_len + 1}")
    do_eval = cfg.eval_batches > 0
    if do_eval and len(val_tokens) < cfg.seq_len + 1:
        raise UserError(f"data {corpus.name}: {len(val_tokens)} validation tokens, need at least seq_len + 1 = "
                        f"{cfg.seq_len + 1} (or set eval_batches 0)")

    # --- model and optimizer -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    model.train()
    param_names, groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=lr_at(0, total_steps, cfg.lr, cfg.warmup_frac, cfg.min_lr_frac),
                                  betas=cfg.betas, eps=cfg.eps, **opt_kwargs)

    start_step, prior_wall, window, records = 0, 0.0, [], []
    last_val: dict = {}
    if resuming:
        from safetensors.torch import load_file

        state = json.loads((out_dir / STATE_FILE).read_text())
        if state.get("format") != STATE_FORMAT or state.get("version", 0) > STATE_VERSION:
            raise UserError(f"{out_dir / STATE_FILE}: not a meshprobe training state this version can read")
        weights = load_file(str(out_dir / WEIGHTS_FILE), device=str(device))
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        load_optimizer_state(optimizer, (out_dir / OPTIMIZER_FILE).read_bytes(), state["optimizer"], param_names)
        load_rng_state((out_dir / RNG_FILE).read_bytes(), state["rng"], device)
        start_step = int(state["step"])
        prior_wall = float(state.get("wall_time_s", 0.0))
        window = [float(v) for v in state.get("window_losses", [])]
        last_val = dict(state.get("last_val", {}))
        records = read_log(out_dir / LOG_FILE, max_step=start_step)
        old = saved_config.get("metadata", {}).get("train", {})
        changed = [k for k in ("data", "seed", "batch_size", "seq_len") if k in old and old[k] != cfg.to_dict()[k]]
        if changed:
            _say(show, f"meshprobe train: note: {', '.join(changed)} changed since the checkpoint; the batch stream "
                       "differs from the original run")

    fwd_model = torch.compile(model) if cfg.compile else model
    ddp = None
    if world > 1 or _dist_initialized():
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # compile first, then wrap (the nanoGPT order; no_sync works on the wrapper for accumulation).
        # No buffer syncing in forward: the only buffers are the constant rotary tables.
        no_sync_buffers = ({"forward_sync_buffers": False}  # torch >= 2.13
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(fwd_model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **no_sync_buffers)
        fwd_model = ddp

    ddp_backend = torch.distributed.get_backend() if ddp is not None else None
    counts = model.parameter_counts()
    data_meta = {"spec": cfg.data, "fingerprint": corpus.fingerprint, "train_tokens": int(len(train_tokens)),
                  "val_tokens": int(len(val_tokens)), "tokenizer": tok_source,
                  "tokenizer_vocab_size": tokenizer.get_vocab_size()}
    dev_name = device_name(device)
    t_start = time.time()

    def metadata(step: int, status: str) -> dict:
        last_train = next((r for r in reversed(records) if r["type"] == "train"), {})
        return {
            "train": cfg.to_dict(), "step": step, "total_steps": total_steps,
            "tokens_seen": step * cfg.tokens_per_step, "complete": step >= total_steps, "status": status,
            "wall_time_s": round(prior_wall + time.time() - t_start, 3), "train_loss": last_train.get("loss"),
            "val_loss": last_val.get("val_loss"), "val_ppl": last_val.get("val_ppl"), "val_step": last_val.get("step"),
            "device": dev_name, "world_size": world, "precision": precision, "data": data_meta,
            "ddp_backend": ddp_backend,
            "parameters": counts, "meshprobe_version": meshprobe.__version__, "torch_version": torch.__version__,
        }

    def save(step: int, status: str) -> None:
        if rank == 0:
            opt_bytes, opt_meta = optimizer_state_files(optimizer, param_names)
            rng_bytes, rng_meta = rng_state_files(device)
            state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "total_steps": total_steps,
                     "tokens_seen": step * cfg.tokens_per_step,
                     "wall_time_s": round(prior_wall + time.time() - t_start, 3), "window_losses": window,
                     "last_val": last_val, "world_size": world, "optimizer": opt_meta, "rng": rng_meta}
            save_checkpoint(model, out_dir, tokenizer=tokenizer,
                            files={OPTIMIZER_FILE: opt_bytes, RNG_FILE: rng_bytes,
                                   STATE_FILE: json.dumps(state), LOG_FILE: _log_text(records)},
                            **metadata(step, status))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    def emit(record: dict) -> None:
        records.append(record)
        if rank == 0:
            with open(out_dir / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    if show:
        n_unrolled = model_cfg.unrolled_depth
        _say(show, f"meshprobe train: {model_cfg.layout} {model_cfg.variant} (unrolled depth {n_unrolled}), "
                   f"{counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding); "
                   f"{total_steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens on {dev_name}"
                   f"{f' x {world} processes' if world > 1 else ''}, {precision}; data {corpus.name} "
                   f"({len(train_tokens):,} train / {len(val_tokens):,} val tokens)"
                   + (f"; resuming at step {start_step}" if resuming else ""))

    if not resuming:
        save(0, "started")  # creates (or replaces, with overwrite) out_dir; the live log is appended to it
    elif rank == 0:
        (out_dir / LOG_FILE).write_text(_log_text(records), encoding="utf-8")  # cut back to the checkpoint

    status = "completed"
    step = start_step
    pending: list = []  # this step's losses (device tensors) not yet reduced / checked
    tokens_run = 0
    t_log, tokens_at_log = time.time(), 0
    lr = grad_norm = None
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not _terminal(sys.stderr), desc="train")
    n_micro = (cfg.batch_size // world) // micro

    def materialize() -> None:
        """Reduce pending losses over ranks, check them, move them into the logging window."""
        nonlocal pending
        if not pending:
            return
        vals = torch.stack(pending)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(vals)
            vals = vals / world
        values = vals.tolist()
        first = step - len(values) + 1
        for i, v in enumerate(values):
            if not math.isfinite(v):
                last = read_log_step(out_dir)
                raise TrainingDiverged(
                    f"loss is {v} at step {first + i} (lr {lr:.3g}); stopped without saving, the last good "
                    f"checkpoint in {out_dir} (step {last}) is kept")
        window.extend(values)
        pending = []

    try:
        with _StopRequest(announce=show) as stop:
            while step < total_steps:
                lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_frac, cfg.min_lr_frac)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x_np, y_np = data.get_batch(train_tokens, cfg.batch_size, cfg.seq_len, step, cfg.seed, rank, world)
                x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
                if device.type == "cuda":
                    x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
                loss_sum = None
                for i in range(n_micro):
                    sync = ddp.no_sync() if (ddp is not None and i < n_micro - 1) else nullcontext()
                    with sync:
                        with autocast_for(device, precision):
                            loss = compute_loss(fwd_model, x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro])
                        (loss / n_micro if n_micro > 1 else loss).backward()
                    loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pending.append(loss_sum / n_micro if n_micro > 1 else loss_sum)
                step += 1
                tokens_run += cfg.tokens_per_step
                if _step_hook is not None:
                    _step_hook(step)

                last = step == total_steps
                need_log = step % cfg.log_every == 0 or last
                need_eval = do_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
                need_save = bool(cfg.save_every and step % cfg.save_every == 0) or last
                stop_now = False
                if world == 1:
                    stop_now = stop.requested
                elif need_log:
                    import torch.distributed as dist

                    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
                    dist.all_reduce(flag)
                    stop_now = flag.item() > 0
                stopped_after = cfg.stop_after is not None and step == cfg.stop_after and not last
                stop_now = stop_now and not last
                if device.type == "cpu" or need_log or need_eval or need_save or stop_now or stopped_after:
                    materialize()
                if bar is not None:
                    bar.update(1)
                if need_log:
                    now = time.time()
                    tps = (tokens_run - tokens_at_log) / max(now - t_log, 1e-9)
                    t_log, tokens_at_log = now, tokens_run
                    rec = {"type": "train", "step": step, "tokens": step * cfg.tokens_per_step,
                           "loss": sum(window) / len(window), "lr": lr, "grad_norm": float(grad_norm),
                           "tokens_per_s": round(tps, 1), "elapsed_s": round(prior_wall + now - t_start, 3)}
                    window = []
                    emit(rec)
                    if bar is not None and not bar.disable:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    else:
                        _say(show, f"step {step}/{total_steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                                   f"{tps:,.0f} tok/s")
                if need_eval:
                    t_eval = time.time()
                    val_loss, _ = evaluate(model, val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device,
                                           precision, rank, world, chunk=micro)
                    last_val = {"step": step, "val_loss": val_loss, "val_ppl": _ppl(val_loss)}
                    emit({"type": "eval", "step": step, "tokens": step * cfg.tokens_per_step,
                          "val_loss": val_loss, "val_ppl": last_val["val_ppl"]})
                    _say(show, f"step {step}/{total_steps} | val loss {val_loss:.4f} | val ppl {last_val['val_ppl']:.2f}",
                         bar)
                    t_log += time.time() - t_eval  # keep evaluation out of the next tokens/s figure
                if stop_now or stopped_after:
                    status = "interrupted" if stop_now else "stopped"
                    save(step, status)
                    break
                if need_save:
                    save(step, "completed" if last else "running")
    finally:
        if bar is not None:
            bar.close()

    wall = time.time() - t_start
    summary = {
        "out_dir": str(out_dir), "status": status, "step": step, "total_steps": total_steps,
        "tokens_seen": step * cfg.tokens_per_step,
        "train_loss": next((r["loss"] for r in reversed(records) if r["type"] == "train"), None),
        "val_loss": last_val.get("val_loss"), "val_ppl": last_val.get("val_ppl"),
        "wall_time_s": round(prior_wall + wall, 3), "tokens_per_s": round(tokens_run / max(wall, 1e-9), 1),
        "device": dev_name, "world_size": world,
    }
    if show:
        if status == "completed":
            val = f", val loss {summary['val_loss']:.4f}, ppl {summary['val_ppl']:.2f}" if do_eval else ""
            _say(show, f"meshprobe train: done, {step} steps{val}, {wall:.1f} s; checkpoint {out_dir}")
    return summary


def read_log_step(out_dir: Path) -> int | None:
    """The step of the checkpoint currently in out_dir (None if unreadable)."""
    try:
        return int(json.loads((Path(out_dir) / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------------------
# Evaluating a checkpoint
# ---------------------------------------------------------------------------------------------------------
def evaluate_checkpoint(path: str | os.PathLike, data_spec: str | Sequence[str] | None = None,
                        batches: int | None = None, batch_size: int | None = None, seq_len: int | None = None,
                        device: str = "auto", split: str = "val") -> dict:
    """Validation loss and perplexity of a checkpoint with its own tokenizer.

    Defaults come from the checkpoint's train metadata: the corpus (`data`), seq_len, batch_size and
    eval_batches (falling back to n_ctx, 16 and 50). Returns dict(checkpoint, data, split, loss, ppl, tokens,
    batches, batch_size, seq_len, step).
    """
    from meshprobe import data
    from meshprobe.checkpoint import load_checkpoint, load_tokenizer, read_checkpoint_config

    config = read_checkpoint_config(path)
    meta = config.get("metadata", {}) or {}
    tcfg = meta.get("train", {}) or {}
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise UserError(f"{path} has no tokenizer.json; cannot tokenize evaluation text")
    spec = data_spec if data_spec else tcfg.get("data", "shakespeare")
    n_ctx = config["model"]["n_ctx"]
    seq_len = seq_len or tcfg.get("seq_len") or n_ctx
    if seq_len > n_ctx:
        raise UserError(f"seq_len {seq_len} is above the model context n_ctx={n_ctx}")
    batch_size = batch_size or tcfg.get("batch_size") or 16
    batches = batches if batches is not None else (tcfg.get("eval_batches") or 50)
    if batches < 1 or batch_size < 1 or seq_len < 1:
        raise UserError("batches, batch size and seq_len must be positive")
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, not {split!r}")
    dev = resolve_device(device)
    if tokenizer.get_vocab_size() > config["model"]["vocab_size"]:
        raise UserError(f"{path}: tokenizer larger than the model vocabulary")
    corpus = data.open_corpus(spec)
    tokens = data.tokenize_corpus(corpus, tokenizer)[split]
    if len(tokens) < seq_len + 1:
        raise UserError(f"data {corpus.name}: only {len(tokens)} {split} tokens, need at least {seq_len + 1}")
    model = load_checkpoint(path, device=dev)
    loss, n = evaluate(model, tokens, batch_size, seq_len, batches, dev, "auto")
    return {"checkpoint": str(path), "data": spec, "split": split, "loss": loss, "ppl": _ppl(loss), "tokens": n,
            "batches": min(batches, math.ceil(((len(tokens) - 1) // seq_len) / batch_size)),
            "batch_size": batch_size, "seq_len": seq_len, "step": meta.get("step")}
