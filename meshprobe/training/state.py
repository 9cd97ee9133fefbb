"""The training state of a checkpoint: optimizer and RNG states, the step, the training log. Nothing is pickled.
Also the checks before a run writes anything (output folder, checkpoint to resume, memory) and the step right
before its first write (lock, recovery of an interrupted save).

Files beside the model in a training checkpoint (:mod:`meshprobe.checkpoint` writes them atomically):

==========================  ================================================================================
``optimizer.safetensors``   AdamW state tensors, keys ``state.{param index}.{exp_avg|exp_avg_sq|step}``
``rng.safetensors``         torch CPU (and CUDA) generator states as uint8 tensors, numpy's MT19937 key
``training_state.json``     step, param names per index, param_groups, the partial loss-logging window,
                            python/numpy RNG scalars, wall time, last validation figures
``train_log.jsonl``         one JSON object per logged event; appended live between checkpoints
==========================  ================================================================================

Snapshots (``keep_every``): light checkpoints (model + config.json, status "snapshot", no training state) in
``<out_dir>.snapshots/step-NNNNNN`` beside the run, each written with the checkpoint save protocol.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from meshprobe import _io
from meshprobe.checks import check_fits
from meshprobe.config import check_memory
from meshprobe.errors import UserError

LOG_FILE = "train_log.jsonl"
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FORMAT = "meshprobe-train-state"
STATE_VERSION = 1


SNAPSHOT_SUFFIX = ".snapshots"


def snapshot_dir(out_dir: str | os.PathLike) -> Path:
    """The folder holding the snapshots of the run in `out_dir`: ``<out_dir>.snapshots`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / (out_dir.name + SNAPSHOT_SUFFIX)


def snapshot_path(out_dir: str | os.PathLike, step: int) -> Path:
    """Where the snapshot of `out_dir` at `step` is kept."""
    return snapshot_dir(out_dir) / f"step-{step:06d}"


def snapshot_paths(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete snapshots of the run in `out_dir` as (step, path), by step ([] when there are none)."""
    folder = snapshot_dir(out_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("step-*"):
        if path.name[5:].isdigit() and (path / "config.json").is_file():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def keep_snapshot(run, metadata) -> None:
    """With ``keep_every``, at step 0 and every ``keep_every`` steps: a light copy of the run's model (weights +
    config.json with ``metadata(run, "snapshot")``, no optimizer or RNG state) at :func:`snapshot_path`, with the
    checkpoint save protocol (a resumed run that passes the step again replaces it). Rank 0 only."""
    from meshprobe.checkpoint import save_checkpoint

    every = run.cfg.keep_every
    if run.rank == 0 and every and run.step % every == 0:
        save_checkpoint(run.model, snapshot_path(run.out_dir, run.step), tokenizer=run.tokenizer,
                        **metadata(run, "snapshot"))


_POLICY_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_state_files(optimizer, param_names: list[str]) -> tuple[bytes, dict]:
    """Flatten an optimizer state dict: tensors -> safetensors bytes (``state.{i}.{key}``), the rest -> JSON."""
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


def _corrupt(path: Path, what: str, exc: BaseException) -> UserError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path}: {what} ({detail})")


_RESTORE_ERRORS = (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError)


def _load_tensors(path: Path) -> dict:
    from safetensors import SafetensorError

    try:
        return load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(path, "truncated or corrupt", exc) from None


def load_optimizer_state(optimizer, path: Path, meta: dict, param_names: list[str], params: list) -> None:
    """Restore AdamW from ``optimizer.safetensors`` + its JSON part; every tensor's shape is checked against
    its parameter first, so a damaged file is a one-line UserError, never a failure later in a step."""
    tensors = _load_tensors(path)
    try:
        if meta["param_names"] != param_names:
            raise UserError(f"{path}: the optimizer state does not match the model's parameters")
        state: dict[int, dict] = {}
        for name, value in list(tensors.items()) + list(meta["scalars"].items()):
            _, idx, key = name.split(".", 2)
            i = int(idx)
            if not 0 <= i < len(params) or key not in ("exp_avg", "exp_avg_sq", "step"):
                raise ValueError(f"unexpected entry {name!r}")
            if key != "step" and (not torch.is_tensor(value) or value.shape != params[i].shape
                                  or not value.is_floating_point()):
                raise ValueError(f"{name} does not match parameter {param_names[i]} {tuple(params[i].shape)}")
            state.setdefault(i, {})[key] = value
        for i, entries in state.items():  # AdamW keeps all three for a parameter once it has stepped
            missing = sorted({"exp_avg", "exp_avg_sq", "step"} - set(entries))
            if missing:
                raise ValueError(f"no {', '.join(f'state.{i}.{k}' for k in missing)} for parameter {param_names[i]}")
        if len(meta["param_groups"]) != len(optimizer.param_groups):
            raise UserError(f"{path}: the optimizer has a different number of parameter groups")
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
    except UserError:
        raise
    except _RESTORE_ERRORS as exc:
        raise _corrupt(path, "cannot restore the optimizer state", exc) from None


def rng_state_files(device) -> tuple[bytes, dict]:
    """RNG states: torch CPU/CUDA generators and numpy's MT19937 key as tensors; python's state as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py_version, list(py_state), py_gauss]}
    return save(tensors), meta


def load_rng_state(path: Path, meta: dict, device) -> None:
    """Restore the RNG states of ``rng.safetensors`` + its JSON part (one-line UserError when damaged)."""
    tensors = _load_tensors(path)
    try:
        cpu = tensors["torch_cpu"]
        if cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
            raise ValueError(f"torch_cpu has {cpu.dtype} {tuple(cpu.shape)}")
        kind, pos, has_gauss, cached = meta["numpy"]
        py_version, py_state, py_gauss = meta["python"]
        torch.set_rng_state(cpu)
        if device.type == "cuda" and "torch_cuda" in tensors:
            torch.cuda.set_rng_state(tensors["torch_cuda"], device)
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((py_version, tuple(py_state), py_gauss))
    except _RESTORE_ERRORS as exc:
        raise _corrupt(path, "cannot restore the RNG state", exc) from None


def read_log(path: Path, max_step: int | None = None) -> list[dict]:
    """Records of a train_log.jsonl, keeping those with step <= max_step; stops at a torn last line. A log
    that is a folder, not UTF-8, or holds a record without an integer step is a one-line UserError (a resume
    reads it before it rewrites anything)."""
    return _io.read_jsonl(path, max_step)


def read_state(folder: Path) -> dict:
    """The training_state.json of a checkpoint folder, checked (one-line UserError naming the file)."""
    path = Path(folder) / STATE_FILE
    state = _io.read_json(path)
    if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT
            or not isinstance(state.get("version"), int) or state["version"] > STATE_VERSION):
        raise UserError(f"{path}: not a meshprobe training state this version can read")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{path}: step must be an integer >= 0, got {step!r}")
    if not isinstance(state.get("optimizer"), dict) or not isinstance(state.get("rng"), dict):
        raise UserError(f"{path}: optimizer and rng entries must be JSON objects")
    return state


def read_state_step(out_dir: Path) -> int | None:
    """The step of the checkpoint currently in out_dir (None if unreadable)."""
    try:
        return int(json.loads((Path(out_dir) / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool, src: Path | None = None) -> bool:
    """Validate the output directory before anything is written; return True when resuming an existing run.

    src: where the newest complete checkpoint saved to out_dir lies (:func:`meshprobe.checkpoint.resolve_checkpoint`;
    out_dir itself, or what a save killed mid-switch left beside it)."""
    src = out_dir if src is None else src
    if resume and overwrite:
        raise UserError("use --resume or --overwrite, not both")
    if not out_dir.exists() and src == out_dir:
        return False
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")
    if resume:
        if not _is_checkpoint(src):
            raise UserError(f"cannot resume: {out_dir} is not a meshprobe checkpoint (no config.json)")
        missing = [f for f in (STATE_FILE, OPTIMIZER_FILE, RNG_FILE) if not (src / f).is_file()]
        if missing:
            raise UserError(f"cannot resume: {out_dir} has no training state (missing {', '.join(missing)})")
        return True
    if overwrite:
        if out_dir.exists() and not _is_checkpoint(out_dir) and any(out_dir.iterdir()):
            raise UserError(f"refusing to overwrite {out_dir}: it is not a meshprobe checkpoint and not empty")
        return False
    where = "" if src == out_dir else f" (a save that was interrupted left it in {src.name})"
    raise UserError(f"output directory {out_dir} exists{where}; pass --resume to continue it or --overwrite to "
                    "replace it")


def describe_diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {b.get(k)!r} in the checkpoint vs {a.get(k)!r}" for k in keys[:4])


def check_train_memory(model_cfg, device) -> None:
    """Refuse a model that cannot fit before anything is allocated: fp32 weights, gradients and two AdamW
    moments (16 bytes a parameter) against the GPU's memory (on CUDA) or this machine's."""
    check_memory(model_cfg, 4, "its fp32 weights")
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    check_memory(model_cfg, 16, "training (weights, gradients, AdamW moments)", total)


def check_batch_memory(model_cfg, train_cfg, per_rank: int, micro: int, device) -> None:
    """Refuse a batch that cannot fit before anything is allocated or written: the step's two int64 token
    arrays [per_rank, seq_len] in this machine's memory, and (a lower bound of the activations the backward
    pass keeps) one fp32 residual stream per unrolled layer of a micro-batch, on the GPU on CUDA."""
    seq = train_cfg.seq_len
    check_fits(2 * 8 * per_rank * seq, f"a batch of {per_rank} x {seq} tokens (batch_size)")
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    check_fits(4 * micro * seq * model_cfg.d_model * (model_cfg.unrolled_depth + 1),
               f"the activations of {micro} x {seq} tokens (micro_batch_size or batch_size)", total)


def begin_writing(out_dir: Path, take_lock=None) -> None:
    """Right before a run's first write: take the output lock if it waited for the parent folder to exist
    (`take_lock`), then finish a save that a crash interrupted (the newest complete checkpoint becomes
    out_dir; the leftovers go: we hold the lock, so their writers are dead)."""
    from meshprobe.checkpoint import recover_checkpoint, resolve_checkpoint

    if take_lock is not None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        take_lock()
        if os.path.lexists(out_dir) or resolve_checkpoint(out_dir) != out_dir:
            raise UserError(f"{out_dir} appeared while this run was starting; not touching it")
    recover_checkpoint(out_dir, locked=True)


def check_resume(model_cfg, train_cfg, out_dir: Path, src: Path, resume: bool, overwrite: bool,
                 show: bool) -> bool:
    """Validate the output directory (and a checkpoint to resume, read from `src`) before anything is written;
    return True when resuming."""
    from meshprobe.checkpoint import read_checkpoint_config
    from meshprobe.runtime import say

    resuming = check_out_dir(out_dir, resume, overwrite, src)
    if resuming:
        saved = read_checkpoint_config(src)
        if saved["model"] != model_cfg.to_dict():
            raise UserError(f"cannot resume {out_dir} with a different model config ("
                            f"{describe_diff(model_cfg.to_dict(), saved['model'])})")
        saved_step = read_state(src)["step"]
        if saved_step > train_cfg.total_steps:
            raise UserError(f"cannot resume {out_dir}: it is at step {saved_step}, beyond the run's "
                            f"{train_cfg.total_steps} steps (raise --steps)")
        old = saved.get("metadata", {}).get("train", {})
        new = train_cfg.to_dict()
        changed = [k for k in ("data", "seed", "batch_size", "seq_len") if k in old and old[k] != new[k]]
        if changed:
            say(show, f"meshprobe train: note: {', '.join(changed)} changed since the checkpoint; the batch stream "
                      "differs from the original run")
    return resuming
