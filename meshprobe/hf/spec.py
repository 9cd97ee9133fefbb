"""Loop specs: where the loop steps of a Hugging Face looped language model live.

A :class:`LoopSpec` names, by module path inside the transformers model (``model.layers.2``, ``lm_head``):

* ``loop_module``: the module whose calls end the loop steps (called once per step per forward); the state
  leaving step t, ``h^(t+1)``, is read off its call t (``loop_read``);
* ``loop_in_module``: the module whose input at call t is the state entering step t, ``h^(t)`` (``loop_in_read``,
  default: the input of ``loop_module``);
* ``steps_field``: the config field holding the number of steps (``steps_kwarg``: a forward argument that sets
  it instead, Huginn's ``num_steps``);
* ``embed_module`` (h_emb), ``final_module`` / ``final_read`` / ``final_call`` (h_out, the state the readout
  decodes), ``readout`` (the modules that turn a state into logits, applied in order: the per-step lens);
* optional nested steps (HRM-Text's L cycles: ``inner_module``, ``inner_in_module``, ``inner_steps_field``)
  and per-step extras (``extras``: ``{hook name: module}``, the module's output at call t, e.g. Ouro's exit gate).

How a value is read: ``"output"`` (the module returns a tensor), ``"output[0]"`` (the first element of a
returned tuple), ``"auto"`` (the output if it is a tensor, else its first element: for code whose releases
differ), ``"input"`` (the first positional argument, else the ``hidden_states`` keyword).

Built-in specs (:func:`builtin_spec`) cover DoryForCausalLM, HrmTextForCausalLM and Inkling2LoopForCausalLM
(built natively by transformers) and OuroForCausalLM and RavenForCausalLM (Huginn; remote code, their specs
follow the published module layout). Any other looped model works with a spec given as a dict or JSON file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from meshprobe.errors import UserError

__all__ = ["BUILTIN_ARCHITECTURES", "READS", "LoopSpec", "as_spec", "builtin_spec"]

READS = ("output", "output[0]", "auto", "input")


@dataclass
class LoopSpec:
    """Where the loop steps of one model live (see the module docstring); module paths are dotted names of
    ``model.named_modules()``."""

    loop_module: str
    steps_field: str | None
    embed_module: str
    final_module: str
    readout: list[str]
    loop_read: str = "output"
    loop_in_module: str | None = None
    loop_in_read: str = "input"
    steps_kwarg: str | None = None
    final_read: str = "input"
    final_call: int = 0
    inner_module: str | None = None
    inner_read: str = "output"
    inner_in_module: str | None = None
    inner_in_read: str = "input"
    inner_steps_field: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    architecture: str = "custom"
    notes: str = ""

    def __post_init__(self):
        for name in ("loop_module", "embed_module", "final_module"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"loop spec: {name} must be a module name, got {getattr(self, name)!r}")
        for name in ("loop_in_module", "inner_module", "inner_in_module", "steps_field", "steps_kwarg",
                     "inner_steps_field"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"loop spec: {name} must be a string or null, got {getattr(self, name)!r}")
        if not isinstance(self.extras, dict) or not all(isinstance(v, str) for v in self.extras.values()):
            raise UserError("loop spec: extras must map hook names to module names")
        if isinstance(self.final_call, bool) or not isinstance(self.final_call, int):
            raise UserError(f"loop spec: final_call must be an integer, got {self.final_call!r}")
        for name in ("loop_read", "loop_in_read", "final_read", "inner_read", "inner_in_read"):
            if getattr(self, name) not in READS:
                raise UserError(f"loop spec: {name} must be one of {', '.join(READS)}, got {getattr(self, name)!r}")
        if not isinstance(self.readout, list) or not self.readout or not all(isinstance(r, str) and r
                                                                            for r in self.readout):
            raise UserError("loop spec: readout must be a non-empty list of module names")
        if self.steps_field is None and self.steps_kwarg is None:
            raise UserError("loop spec: give steps_field (a config field) or steps_kwarg (a forward argument)")
        if self.final_call < 0:
            raise UserError(f"loop spec: final_call must be >= 0, got {self.final_call}")
        if bool(self.inner_module) != bool(self.inner_steps_field):
            raise UserError("loop spec: inner_module and inner_steps_field go together")
        for name in self.extras:
            if not name.startswith("hook_") or "." in name:
                raise UserError(f"loop spec: extras names must look like 'hook_<name>', got {name!r}")
        if self.loop_in_module is None:
            self.loop_in_module = self.loop_module
        if self.inner_module and self.inner_in_module is None:
            self.inner_in_module = self.inner_module

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (what ``--loop-spec FILE.json`` reads)."""
        return asdict(self)

    def modules(self) -> list[str]:
        """Every module path the spec names."""
        names = [self.loop_module, self.loop_in_module, self.embed_module, self.final_module, *self.readout]
        names += [n for n in (self.inner_module, self.inner_in_module) if n] + list(self.extras.values())
        return list(dict.fromkeys(names))


def as_spec(spec: LoopSpec | Mapping[str, Any] | str | os.PathLike) -> LoopSpec:
    """A :class:`LoopSpec` from a LoopSpec, a dict, or the path of a JSON file holding that dict."""
    if isinstance(spec, LoopSpec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        try:
            spec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"loop spec {p}: not a readable JSON file ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, Mapping):
        raise UserError(f"loop spec must be a LoopSpec, a dict or a JSON file, got {type(spec).__name__}")
    known = {f.name for f in fields(LoopSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise UserError(f"loop spec: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return LoopSpec(**dict(spec))
    except TypeError as exc:
        raise UserError(f"loop spec: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# built-in specs, one function of the config (and the number of loop steps) per architecture
# ---------------------------------------------------------------------------------------------------------
def _dory(config, n_loops: int) -> LoopSpec:
    start, n_rec = config.n_input_layers, config.n_recurrent_layers
    last = config.num_hidden_layers - 1
    # h_out: the input of the final model.norm (its last call: once before the loop, once per step, once at the end)
    return LoopSpec(
        architecture="DoryForCausalLM", loop_module=f"model.layers.{start + n_rec - 1}",
        loop_in_module=f"model.layers.{start}", steps_field="n_recurrent_loops", embed_module="model.embed_tokens",
        final_module="model.norm", final_call=n_loops + 1, readout=["model.norm", "lm_head"],
        notes=f"loop body: model.layers.{start}..{start + n_rec - 1}; h^(t) = norm(h) + norm(prelude output) "
              f"(the body's input); h_out = input of the final model.norm (layer {last}'s output)")


def _hrm_text(config, n_loops: int) -> LoopSpec:
    return LoopSpec(
        architecture="HrmTextForCausalLM", loop_module="model.H_module", steps_field="H_cycles",
        embed_module="model.embed_tokens", final_module="lm_head", readout=["lm_head"],
        inner_module="model.L_module", inner_steps_field="L_cycles",
        notes="outer steps: model.H_module (input z_H + z_L); inner steps loop.{t}.inner.{s}: model.L_module "
              "(input z_L + z_H); h_emb is the embedding before embedding_scale; H_module ends with its own norm, "
              "so h_out = h^(K)")


def _inkling2_loop(config, n_loops: int) -> LoopSpec:
    start, end = config.loop_layer_index_start, config.loop_layer_index_end
    return LoopSpec(
        architecture="Inkling2LoopForCausalLM", loop_module=f"model.layers.{end - 1}",
        loop_in_module=f"model.layers.{start}", steps_field="loop_num_passes", embed_module="model.embed_tokens",
        final_module="model.norm", readout=["model.norm", "lm_head", "logit_softcap"],
        notes=f"loop body: model.layers.{start}..{end - 1}; every pass restarts from the pre-loop state (so "
              "h^(t) is the same for every t) and gets gated messages from the previous pass; h_out = input of "
              "model.norm (after model.final_input); the lens skips final_input (it needs the block states)")


def _ouro(config, n_loops: int) -> LoopSpec:
    return LoopSpec(
        architecture="OuroForCausalLM", loop_module="model.norm", loop_in_module="model.layers.0",
        steps_field="total_ut_steps", embed_module="model.embed_tokens", final_module="lm_head",
        readout=["lm_head"], extras={"hook_exit_logit": "model.early_exit_gate"},
        notes="each step runs all of model.layers then model.norm; loop.{t}.hook_exit_logit = early_exit_gate "
              "logit of step t (exit distribution lambda_t = sigmoid); h_out = lm_head's input, the last step's "
              "state unless exit_at_step / early_exit_threshold make the model decode another step; remote "
              "code, spec from the published module layout")


def _raven(config, n_loops: int) -> LoopSpec:
    n_core = int(getattr(config, "n_layers_in_recurrent_block", 4))
    n_coda = int(getattr(config, "n_layers_in_coda", 2))
    return LoopSpec(
        architecture="RavenForCausalLM", loop_module=f"transformer.core_block.{n_core - 1}", loop_read="auto",
        loop_in_module="transformer.core_block.0", steps_field="mean_recurrence", steps_kwarg="num_steps",
        embed_module="transformer.wte", final_module=f"transformer.coda.{n_coda - 1}", final_read="auto",
        readout=["transformer.ln_f", "lm_head"],
        notes="h^(t) = adapter(concat(state, prelude output)), the core block's input; the initial state is "
              "random (fix torch's seed to compare runs); an int num_steps runs every step under no_grad; "
              "h_out = coda output before ln_f; blocks return a tensor or (tensor, attention) depending on the "
              "release (read 'auto'); remote code, spec from the published module layout")


_BUILTIN: dict[str, Callable[[Any, int], LoopSpec]] = {
    "DoryForCausalLM": _dory, "HrmTextForCausalLM": _hrm_text, "Inkling2LoopForCausalLM": _inkling2_loop,
    "OuroForCausalLM": _ouro, "RavenForCausalLM": _raven,
}
BUILTIN_ARCHITECTURES = tuple(_BUILTIN)


def builtin_spec(architecture: str, config, n_loops: int) -> LoopSpec | None:
    """The built-in spec of ``architecture`` (a class name such as ``DoryForCausalLM``) for a model with this
    config run with ``n_loops`` steps; ``None`` when there is none."""
    fn = _BUILTIN.get(architecture)
    return None if fn is None else fn(config, n_loops)


class _AnyConfig:
    """A stand-in config whose every field is 1: enough to read which fields a built-in spec counts steps by."""

    def __getattr__(self, name):
        return 1


def step_fields(architecture: str) -> tuple[str | None, str | None]:
    """``(steps_field, inner_steps_field)`` of the built-in spec of ``architecture`` (``(None, None)`` when there
    is none), read without a config or torch: what a directory's config.json is checked against up front."""
    spec = builtin_spec(architecture, _AnyConfig(), 1)
    return (spec.steps_field, spec.inner_steps_field) if spec else (None, None)
