"""`wrap(model)`: meshprobe's state hooks on a loaded transformers looped language model.

The model's own forward runs unchanged (nothing is copied): PyTorch forward hooks and pre-hooks on the modules
of its :class:`~meshprobe.hf.spec.LoopSpec` count the calls of one forward and send call t of the loop module
through the TransformerLens ``HookPoint`` ``loop.{t}.hook_state_out`` (the value the HookPoint returns replaces
the module's output, so patching works), and likewise ``hook_embed``, ``loop.{t}.hook_state_in``,
``loop.{t}.inner.{s}.hook_state_in/out`` (nested steps), ``loop.{t}.<extra>`` (per-step extras) and
``coda.hook_out`` (h_out, the state the readout decodes). The names are meshprobe's
(:func:`meshprobe.hooks.recursive_state_hooks`): ``hooks.states(cache, K)`` gives h_emb, h^(0) ... h^(K), h_out.

The torch hooks act only while the wrapper's forward runs (calling the transformers model directly is
untouched); after every forward the call counts are checked against the spec (a spec that does not fit the
model is a one-line UserError). The model always runs with ``use_cache=False``. Not supported: torch.compile
of the wrapped model (Python counters in hooks), gradient checkpointing (hooks do not fire on the recompute).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from meshprobe.config import MAX_LAYERS
from meshprobe.errors import UserError
from meshprobe.hf.checks import CTX_FIELDS
from meshprobe.hf.spec import LoopSpec, as_spec, builtin_spec
from meshprobe.tl import ActivationCache, HookedRootModule, HookPoint

__all__ = ["CTX_FIELDS", "HFLoopedModel", "HFModelConfig", "set_loops", "wrap"]


@dataclass
class HFModelConfig:
    """What meshprobe's analyses read from ``model.cfg`` (a wrapped transformers model)."""

    architecture: str
    n_loops: int
    n_inner: int
    d_model: int
    vocab_size: int
    n_ctx: int
    unrolled_depth: int
    is_hf: bool = True
    is_vanilla: bool = False
    variant: str = "hf"
    mesh_slots: int = 0

    @property
    def layout(self) -> str:
        return self.architecture

    def to_dict(self) -> dict:
        return asdict(self)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_state_in = HookPoint()
        self.hook_state_out = HookPoint()


class _Step(nn.Module):
    def __init__(self, n_inner: int, extras):
        super().__init__()
        self.hook_state_in = HookPoint()
        self.hook_state_out = HookPoint()
        if n_inner:
            self.inner = nn.ModuleList(_Inner() for _ in range(n_inner))
        for name in extras:
            setattr(self, name, HookPoint())


class _Coda(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_out = HookPoint()


# -- reading and writing a value at a call site -----------------------------------------------------------
def _read_input(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise UserError("loop spec: a module read as 'input' was called without a positional argument or "
                    "hidden_states keyword")


def _write_input(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _read_output(read: str, output):
    if read == "auto" and isinstance(output, torch.Tensor):
        return output
    if read == "output":
        if not isinstance(output, torch.Tensor):
            raise UserError(f"loop spec: read 'output' of a module that returns {type(output).__name__}; "
                            "use 'output[0]'")
        return output
    if not isinstance(output, (tuple, list)) or not output or not isinstance(output[0], torch.Tensor):
        raise UserError(f"loop spec: read {read!r} of a module that returns {type(output).__name__}")
    return output[0]


def _write_output(read: str, output, value):
    if read == "output" or isinstance(output, torch.Tensor):
        return value
    return type(output)([value, *output[1:]]) if isinstance(output, list) else (value, *output[1:])


class HFLoopedModel(HookedRootModule):
    """A transformers looped LM with meshprobe's state hooks (build it with :func:`wrap`).

    ``model(tokens)`` returns the logits [b, seq, vocab] (``return_type="output"``: the transformers output);
    ``run_with_cache`` / ``run_with_hooks`` work as on meshprobe's own models. ``readout(h)`` decodes a state
    through the model's own final norm and LM head (the per-step lens); ``cfg`` holds what the analyses read.
    """

    def __init__(self, model: nn.Module, spec: LoopSpec, n_loops: int, n_inner: int = 0):
        super().__init__()
        self.hf = model
        self.spec = spec
        self.hook_embed = HookPoint()
        self.loop = nn.ModuleList(_Step(n_inner, spec.extras) for _ in range(n_loops))
        self.coda = _Coda()
        self.cfg = _model_config(model, spec, n_loops, n_inner)
        self.analysis_notes = [(f"transformers model {spec.architecture}: states read through a loop spec "
                                f"({spec.notes or 'user spec'}); relative update of loop t = h^(t) -> h^(t+1); "
                                "coda lens skipped (the coda is not run on its own)")]
        self.checkpoint_dir = None  # the model directory, when loaded by meshprobe.hf.load
        self.trust_remote_code = False
        self._active = False
        self._counts: dict[str, int] = defaultdict(int)
        self._handles: list = []
        self.setup()
        self._install()

    # -- HookedRootModule ------------------------------------------------------------------------------------
    def setup(self):
        """TransformerLens's setup over meshprobe's hook modules only (the transformers model's modules are not
        renamed or listed)."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if name == "" or name == "hf" or name.startswith("hf."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def run_with_cache(self, *args, **kwargs):
        """TransformerLens's run_with_cache, the cache as an ``ActivationCache`` (indexable by hook name)."""
        out, cache = super().run_with_cache(*args, **kwargs)
        if isinstance(cache, ActivationCache):
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    @property
    def n_loops(self) -> int:
        return self.cfg.n_loops

    @property
    def embed(self) -> nn.Module:
        """The input embedding (its weight is the probes' retrieval code)."""
        return self.hf.get_input_embeddings()

    def forward(self, tokens: torch.Tensor, return_type: str | None = "logits", **kwargs):
        """Run the transformers model's own forward on ``tokens`` [b, seq] (``use_cache=False``; Huginn-style
        models get their step count as the forward argument). ``return_type``: "logits", "output" or None."""
        if return_type not in ("logits", "output", None):
            raise ValueError(f"return_type must be 'logits', 'output' or None, got {return_type!r}")
        kwargs["use_cache"] = False
        if self.spec.steps_kwarg:
            kwargs[self.spec.steps_kwarg] = self.n_loops
        self._counts = defaultdict(int)
        self._active = True
        try:
            out = self.hf(input_ids=tokens, **kwargs)
        finally:
            self._active = False
        self._check_counts()
        if return_type == "logits":
            return out.logits if hasattr(out, "logits") else out[0]
        return out if return_type == "output" else None

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of a state [..., d] through the spec's readout modules (the model's final norm and LM head),
        computed in the model's dtype and returned as float32. Safe inside a hook: these calls are not counted."""
        mods = dict(self.hf.named_modules())
        x = h.to(_param(self.hf).dtype)
        active, self._active = self._active, False
        try:
            for name in self.spec.readout:
                x = mods[name](x)
        finally:
            self._active = active
        return x.to(device=h.device, dtype=torch.float32)  # the head may sit on another device (device_map)

    def parameter_counts(self) -> dict[str, int]:
        """total, non_embedding (without input embedding and LM head; tied weights once), router (0)."""
        total = sum(p.numel() for p in self.hf.parameters())
        emb = {id(p): p.numel() for m in (self.hf.get_input_embeddings(), self.hf.get_output_embeddings())
               if m is not None for p in m.parameters()}
        return {"total": total, "non_embedding": total - sum(emb.values()), "router": 0}

    def state_hook_names(self) -> list[str]:
        """The state-level hooks in the order they fire."""
        names = ["hook_embed"]
        for t, step in enumerate(self.loop):
            names.append(f"loop.{t}.hook_state_in")
            for s in range(self.cfg.n_inner):
                names += [f"loop.{t}.inner.{s}.hook_state_in", f"loop.{t}.inner.{s}.hook_state_out"]
            names += [f"loop.{t}.hook_state_out"] + [f"loop.{t}.{e}" for e in self.spec.extras]
        return names + ["coda.hook_out"]

    def fresh_init(self) -> HFLoopedModel:
        """A freshly initialised model of the same class and config (torch's RNG), wrapped the same way."""
        p = _param(self.hf)
        hf = type(self.hf)(copy.deepcopy(self.hf.config)).to(device=p.device, dtype=p.dtype).eval()
        return HFLoopedModel(hf, self.spec, self.cfg.n_loops, self.cfg.n_inner)

    def remove_loop_hooks(self) -> None:
        """Detach the torch hooks from the transformers model (the wrapper is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- the torch hooks ---------------------------------------------------------------------------------------
    def _sites(self) -> list[tuple[str, str, str]]:
        """(role, module, read) of every call site."""
        s = self.spec
        sites = [("embed", s.embed_module, "output"), ("out", s.loop_module, s.loop_read),
                 ("in", s.loop_in_module, s.loop_in_read), ("final", s.final_module, s.final_read)]
        if self.cfg.n_inner:
            sites += [("inner_in", s.inner_in_module, s.inner_in_read), ("inner_out", s.inner_module, s.inner_read)]
        sites += [(f"extra:{name}", mod, "output") for name, mod in s.extras.items()]
        return sites

    def _hook_point(self, role: str, call: int) -> HookPoint | None:
        K, S = self.cfg.n_loops, self.cfg.n_inner
        if role == "embed":
            return self.hook_embed if call == 0 else None
        if role == "final":
            return self.coda.hook_out if call == self.spec.final_call else None
        limit = K * S if role.startswith("inner") else K
        if call >= limit:
            module = dict(self._module_roles())[role]
            raise UserError(f"loop spec does not fit {self.spec.architecture}: {module} was called more than "
                            f"{limit} times in one forward")
        if role in ("in", "out"):
            return self.loop[call].hook_state_in if role == "in" else self.loop[call].hook_state_out
        if role.startswith("inner"):
            inner = self.loop[call // S].inner[call % S]
            return inner.hook_state_in if role == "inner_in" else inner.hook_state_out
        return getattr(self.loop[call], role.split(":", 1)[1])

    def _module_roles(self) -> list[tuple[str, str]]:
        return [(role, module) for role, module, _ in self._sites()]

    def _install(self) -> None:
        mods = dict(self.hf.named_modules())
        for role, name, read in self._sites():
            if name not in mods:
                raise UserError(f"loop spec does not fit {self.spec.architecture}: the model has no module {name!r}")
            if read == "input":
                self._handles.append(mods[name].register_forward_pre_hook(self._pre_hook(role), with_kwargs=True))
            else:
                self._handles.append(mods[name].register_forward_hook(self._post_hook(role, read), with_kwargs=True))

    def _next_call(self, role: str) -> HookPoint | None:
        call = self._counts[role]
        self._counts[role] = call + 1
        return self._hook_point(role, call)

    def _pre_hook(self, role: str):
        def hook(module, args, kwargs):
            if not self._active:
                return None
            hp = self._next_call(role)
            if hp is None:
                return None
            value = _read_input(args, kwargs)
            new = hp(value)
            return None if new is value else _write_input(args, kwargs, new)
        return hook

    def _post_hook(self, role: str, read: str):
        def hook(module, args, kwargs, output):
            if not self._active:
                return None
            hp = self._next_call(role)
            if hp is None:
                return None
            value = _read_output(read, output)
            new = hp(value)
            return None if new is value else _write_output(read, output, new)
        return hook

    def _check_counts(self) -> None:
        K, S, spec = self.cfg.n_loops, self.cfg.n_inner, self.spec
        want = {"embed": (1, None), "final": (spec.final_call + 1, None), "in": (K, K), "out": (K, K),
                "inner_in": (K * S, K * S), "inner_out": (K * S, K * S)}
        for role, module in self._module_roles():
            lo, hi = want.get(role, (K, K))
            n = self._counts[role]
            if n < lo or (hi is not None and n > hi):
                expect = f"{lo}" if lo == hi else f"at least {lo}"
                raise UserError(f"loop spec does not fit {spec.architecture}: {module} was called {n} times in one "
                                f"forward, expected {expect} ({self.cfg.n_loops} loop steps)")


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _config_int(config, names) -> int | None:
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _model_config(model: nn.Module, spec: LoopSpec, n_loops: int, n_inner: int) -> HFModelConfig:
    config = model.config
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    out = model.get_output_embeddings()
    if out is not None and getattr(out, "weight", None) is not None:
        vocab = min(vocab, out.weight.shape[0])
    d = _config_int(config, ("hidden_size", "n_embd", "d_model")) or emb.weight.shape[1]
    n_ctx = _config_int(config, CTX_FIELDS) or 2048
    depth = _config_int(config, ("num_hidden_layers", "n_layers", "n_layer")) or 0
    return HFModelConfig(architecture=spec.architecture, n_loops=n_loops, n_inner=n_inner, d_model=d,
                         vocab_size=vocab, n_ctx=n_ctx, unrolled_depth=depth)


def _steps(config, field: str | None, what: str) -> int:
    v = getattr(config, field, None) if field else None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"loop spec: the model config has no positive integer {field!r} ({what})")
    if v > MAX_LAYERS:
        raise UserError(f"the model config has {field} = {v}: at most {MAX_LAYERS} loop steps (meshprobe's bound)")
    return v


def set_loops(model: nn.Module, spec: LoopSpec, loops: int) -> None:
    """Make ``model`` run ``loops`` steps: sets the spec's step-count config field, and the same attribute on
    any submodule that copied it at construction (Ouro keeps ``total_ut_steps`` on its base model). Models whose
    step count is a forward argument (``steps_kwarg``) get it from the wrapper at every call (their config is left
    as it is)."""
    if not isinstance(loops, int) or isinstance(loops, bool) or not 1 <= loops <= MAX_LAYERS:
        raise UserError(f"loops={loops!r}: give 1 to {MAX_LAYERS} loop steps (the bound of meshprobe's checkpoints)")
    field = spec.steps_field
    if field is None or spec.steps_kwarg:
        return
    setattr(model.config, field, loops)
    for module in model.modules():
        if isinstance(getattr(module, field, None), int) and not isinstance(module, HookedRootModule):
            setattr(module, field, loops)


def wrap(model: nn.Module, spec: LoopSpec | dict | str | None = None, loops: int | None = None) -> HFLoopedModel:
    """Meshprobe's state hooks on a loaded transformers looped LM (see the module docstring).

    ``spec``: a :class:`~meshprobe.hf.spec.LoopSpec`, a dict, or a JSON file; default: the built-in spec of the
    model's class. ``loops``: run this many loop steps instead of the config's (test-time depth; the config
    field is changed on the model). The model is put in eval mode.
    """
    arch = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise UserError(f"wrap needs a transformers PreTrainedModel, got {arch}")
    builtin = spec is None
    if builtin:
        spec = builtin_spec(arch, config, 1)
        if spec is None:
            raise UserError(f"no built-in loop spec for {arch}: pass spec (a dict or JSON file, see meshprobe.hf.spec)")
    else:
        spec = as_spec(spec)
    if loops is not None:
        set_loops(model, spec, loops)
    if spec.steps_kwarg:
        n_loops = loops if loops is not None else _steps(config, spec.steps_field, f"default of {spec.steps_kwarg}")
    else:
        n_loops = _steps(config, spec.steps_field, "the number of loop steps")
    if builtin:
        spec = builtin_spec(arch, config, n_loops)  # some built-in specs depend on the step count
    n_inner = _steps(config, spec.inner_steps_field, "the number of inner steps") if spec.inner_module else 0
    return HFLoopedModel(model.eval(), spec, n_loops, n_inner)
