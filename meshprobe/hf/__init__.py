"""Hugging Face looped language models, loop step by loop step.

    from meshprobe import hf, hooks
    model = hf.load("path/to/Ouro-1.4B", trust_remote_code=True)   # or hf.wrap(a_loaded_transformers_model)
    logits, cache = model.run_with_cache(tokens)
    hooks.states(cache, model.n_loops)      # h_emb, h^(0), ..., h^(K), h_out
    model.readout(cache["loop.1.hook_state_out"])                   # the lens on h^(2)

:mod:`~meshprobe.hf.spec` (where the loop steps live: :class:`LoopSpec`, the built-in specs),
:mod:`~meshprobe.hf.hooked` (the hooks: :func:`wrap`), :mod:`~meshprobe.hf.loader` (model directories, remote-code
refusal: :func:`load`), :mod:`~meshprobe.hf.checks` (a directory's files checked without torch, before it loads).

The names load lazily: importing ``meshprobe.hf.checks`` or ``meshprobe.hf.loader`` (what the CLI checks its
inputs with) imports no torch.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors see; at run time the names load lazily below
    from meshprobe.hf.hooked import HFLoopedModel, HFModelConfig, set_loops, wrap  # noqa: F401
    from meshprobe.hf.loader import is_hf_dir, load, read_hf_config  # noqa: F401
    from meshprobe.hf.spec import BUILTIN_ARCHITECTURES, LoopSpec, as_spec, builtin_spec  # noqa: F401

_EXPORTS = {
    "HFLoopedModel": "hooked", "HFModelConfig": "hooked", "set_loops": "hooked", "wrap": "hooked",
    "is_hf_dir": "loader", "load": "loader", "read_hf_config": "loader",
    "BUILTIN_ARCHITECTURES": "spec", "LoopSpec": "spec", "as_spec": "spec", "builtin_spec": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"meshprobe.hf.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'meshprobe.hf' has no attribute {name!r}")
