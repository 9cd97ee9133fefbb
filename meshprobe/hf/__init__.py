"""Hugging Face looped language models, loop step by loop step.

    from meshprobe import hf, hooks
    model = hf.load("path/to/Ouro-1.4B", trust_remote_code=True)   # or hf.wrap(a_loaded_transformers_model)
    logits, cache = model.run_with_cache(tokens)
    hooks.states(cache, model.n_loops)      # h_emb, h^(0), ..., h^(K), h_out
    model.readout(cache["loop.1.hook_state_out"])                   # the lens on h^(2)

:mod:`~meshprobe.hf.spec` (where the loop steps live: :class:`LoopSpec`, the built-in specs),
:mod:`~meshprobe.hf.hooked` (the hooks: :func:`wrap`), :mod:`~meshprobe.hf.loader` (model directories, remote-code
refusal: :func:`load`).
"""
from meshprobe.hf.hooked import HFLoopedModel, HFModelConfig, set_loops, wrap
from meshprobe.hf.loader import is_hf_dir, load, read_hf_config
from meshprobe.hf.spec import BUILTIN_ARCHITECTURES, LoopSpec, as_spec, builtin_spec

__all__ = ["BUILTIN_ARCHITECTURES", "HFLoopedModel", "HFModelConfig", "LoopSpec", "as_spec", "builtin_spec",
           "is_hf_dir", "load", "read_hf_config", "set_loops", "wrap"]
