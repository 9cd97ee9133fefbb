"""The checks of `meshprobe features` that need no torch: a model folder's sources from its config alone, the
sizes, a saved crosscoder's JSON against those sources. Bad input is answered before torch loads.

The source names are made here (:func:`source_names`) and :func:`meshprobe.features.sources.source_spec` uses
them, so the check and the run cannot disagree.
"""
from __future__ import annotations

import os
from pathlib import Path

from meshprobe import _io
from meshprobe.errors import UserError

__all__ = ["source_names", "model_sources", "check_sizes", "check_saved", "METHODS", "CONFIG_FILE", "DEFAULT_K",
           "DEFAULT_EXPANSION"]

METHODS = ("batchtopk", "l1")
CONFIG_FILE = "crosscoder.json"
DEFAULT_K, DEFAULT_EXPANSION = 16, 4  # a model's crosscoder: k active features, DEFAULT_EXPANSION x d_model features


def source_names(n_loops: int, mesh_slots: int = 0, emb: bool = False, out: bool = False, slots: bool = True
                 ) -> tuple[list[str], list[str]]:
    """``(names, kinds)`` of the sources of a looped model with K = ``n_loops`` steps: h^(0) ... h^(K), with
    ``emb`` h_emb first, with ``out`` h_out after them, with ``slots`` the ``mesh_slots`` memory slots last."""
    names = [f"h^({t})" for t in range(n_loops + 1)]
    kinds = ["loop"] * len(names)
    if emb:
        names, kinds = ["h_emb"] + names, ["emb"] + kinds
    if out:
        names, kinds = names + ["h_out"], kinds + ["out"]
    if slots and mesh_slots:
        names += [f"slot {b + 1}" for b in range(mesh_slots)]
        kinds += ["slot"] * mesh_slots
    return names, kinds


def check_sizes(n_features: int, k: int, method: str = "batchtopk") -> None:
    """UserError unless 1 <= k < n_features and the method is known (before any work)."""
    if method not in METHODS:
        raise UserError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if int(n_features) < 2:
        raise UserError(f"n_features={n_features} must be at least 2")
    if not 1 <= int(k) < int(n_features):
        raise UserError(f"k={k} must be at least 1 and below n_features={n_features}")


def _no_loop(layout) -> UserError:
    return UserError(f"the model (layout {layout!r}) has no loop: a loop crosscoder needs loop states h^(0..K) "
                     "(train or load a recursive model)")


def model_sources(path: str | os.PathLike, *, trust_remote_code: bool = False, emb: bool = False,
                  out: bool = False, slots: bool = True) -> tuple[list[str] | None, int | None]:
    """``(source names, d_model)`` of a model folder from its config alone (the folder checked as loading would
    check it); ``(None, None)`` for a transformers directory whose loop count is not in its config (the sources
    are checked once it is loaded)."""
    from meshprobe.hf.loader import is_hf_dir

    p = Path(path)
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if is_hf_dir(p):
        from meshprobe.hf.checks import HIDDEN_FIELDS, check_hf_dir, check_loop_counts
        from meshprobe.hf.spec import step_fields

        config = check_hf_dir(p, trust_remote_code=trust_remote_code)
        fields = next((step_fields(a) for a in config.get("architectures") or [] if isinstance(a, str)), (None, None))
        steps = check_loop_counts(p, config, fields, None)
        d = next((config[f] for f in HIDDEN_FIELDS if isinstance(config.get(f), int)), None)
        if not steps:
            return None, d
        return source_names(int(steps), 0, emb, out)[0], d
    from meshprobe.checkpoint import read_checkpoint_config
    from meshprobe.config import ModelConfig

    cfg = ModelConfig.from_dict(read_checkpoint_config(p)["model"])
    if cfg.is_vanilla or not cfg.n_loops:
        raise _no_loop(cfg.layout)
    mesh = int(cfg.mesh_slots or 0) if cfg.variant == "mesh" else 0
    return source_names(cfg.n_loops, mesh, emb, out, slots)[0], int(cfg.d_model)


def check_saved(load: str | os.PathLike, names: list[str] | None, d: int | None, where: str = "load") -> dict:
    """A saved crosscoder's config (its JSON only), checked to read exactly ``names`` at width ``d`` (either None:
    not checked here). Returns the config."""
    folder = _io.committed_dir(Path(load), CONFIG_FILE)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{where}: no {CONFIG_FILE} in {load} (not a saved crosscoder)")
    cfg = _io.read_json(folder / CONFIG_FILE)
    if not isinstance(cfg, dict) or cfg.get("format") != "meshprobe-crosscoder":
        raise UserError(f"{where}: {folder / CONFIG_FILE} is not a meshprobe crosscoder")
    saved, width = cfg.get("source_names"), cfg.get("d")
    if (names is not None and saved != names) or (d is not None and width != d):
        saved = saved if isinstance(saved, list) else []
        raise UserError(f"{where}: the crosscoder reads {len(saved)} sources {saved[:4]}... of width {width}, the "
                        f"model gives {len(names or [])} sources {(names or [])[:4]}... of width {d}")
    return cfg
