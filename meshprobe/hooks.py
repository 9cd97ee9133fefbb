"""Hook names: the one owner of the state names (h_emb, h^(0..K), h_out and their hooks), the hook-name table
documented in the README, and helpers to stack per-iteration activations.

The model (:meth:`MeshprobeModel.state_hook_names`) and the analyses (:func:`meshprobe.analysis.pipeline.collect.state_spec`)
derive their names from the functions here.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# One row per hook-name pattern: (pattern, tensor it holds, shape). The README table is generated from this
# list and a test checks that every HookPoint of every variant matches exactly one row.
HOOK_TABLE: list[tuple[str, str, str]] = [
    ("hook_embed", "h_emb, the scaled token embeddings", "[batch, seq, d]"),
    ("prelude.hook_out", "f_pre(h_emb), the prelude output (recursive models)", "[batch, seq, d]"),
    ("entry.mesh.hook_write_weights", "entry write router weights, input = prelude output (MeSH)", "[batch, seq, B]"),
    ("entry.mesh.hook_read_weights", "entry read router weights; the read gives h^(0) (MeSH)", "[batch, seq, B]"),
    ("entry.mesh.hook_memory", "all B slots after the entry write (MeSH)", "[batch, B, seq, d]"),
    ("loop.{t}.hook_state_in", "h^(t), the state entering loop step t", "[batch, seq, d]"),
    ("loop.{t}.hook_core_out", "f_core(h^(t)) before any residual / anchor / MeSH mixing", "[batch, seq, d]"),
    ("loop.{t}.mesh.hook_write_weights", "step t write router weights, input = h^(t) (MeSH)", "[batch, seq, B]"),
    ("loop.{t}.mesh.hook_read_weights", "step t read router weights, input = h^(t) (MeSH)", "[batch, seq, B]"),
    ("loop.{t}.mesh.hook_memory", "all B slots after step t's write (MeSH)", "[batch, B, seq, d]"),
    ("loop.{t}.hook_state_out", "h^(t+1), the state leaving loop step t", "[batch, seq, d]"),
    ("coda.hook_out", "h_out, the coda output before the final LayerNorm (recursive models)", "[batch, seq, d]"),
    ("blocks.{u}.hook_resid_pre", "input of unrolled layer u (a copy: patching it changes only this layer's "
     "input, not the loop state that routers / carry / anchor also read)", "[batch, seq, d]"),
    ("blocks.{u}.ln1.hook_scale", "sqrt(var + eps) of the attention LayerNorm's input (hooking it leaves the fused LN)",
     "[batch, seq, 1]"),
    ("blocks.{u}.ln1.hook_normalized", "attention LayerNorm output", "[batch, seq, d]"),
    ("blocks.{u}.attn.hook_q", "queries of unrolled layer u, before rotary", "[batch, seq, head, d_head]"),
    ("blocks.{u}.attn.hook_k", "keys, before rotary", "[batch, seq, head, d_head]"),
    ("blocks.{u}.attn.hook_v", "values", "[batch, seq, head, d_head]"),
    ("blocks.{u}.attn.hook_rot_q", "queries after rotary", "[batch, seq, head, d_head]"),
    ("blocks.{u}.attn.hook_rot_k", "keys after rotary", "[batch, seq, head, d_head]"),
    ("blocks.{u}.attn.hook_attn_scores", "masked attention scores before softmax (switches to explicit attention)",
     "[batch, head, query, key]"),
    ("blocks.{u}.attn.hook_pattern", "attention pattern of unrolled layer u (switches to explicit attention)",
     "[batch, head, query, key]"),
    ("blocks.{u}.attn.hook_z", "per-head attention output before W_O", "[batch, seq, head, d_head]"),
    ("blocks.{u}.attn.hook_result", "per-head output z_h W_O[h]; fires only after model.set_use_attn_result(True); "
     "attn_out = sum over heads + b_O", "[batch, seq, head, d]"),
    ("blocks.{u}.hook_attn_out", "attention output of unrolled layer u", "[batch, seq, d]"),
    ("blocks.{u}.ln2.hook_scale", "sqrt(var + eps) of the MLP LayerNorm's input (same input: parallel layer)",
     "[batch, seq, 1]"),
    ("blocks.{u}.ln2.hook_normalized", "MLP LayerNorm output", "[batch, seq, d]"),
    ("blocks.{u}.mlp.hook_pre", "MLP pre-activation", "[batch, seq, 4d]"),
    ("blocks.{u}.mlp.hook_post", "MLP activation (GELU output)", "[batch, seq, 4d]"),
    ("blocks.{u}.hook_mlp_out", "MLP output of unrolled layer u", "[batch, seq, d]"),
    ("blocks.{u}.hook_resid_post", "output of unrolled layer u (= input + attn_out + mlp_out)", "[batch, seq, d]"),
    ("ln_final.hook_scale", "sqrt(var + eps) of the final LayerNorm's input h_out", "[batch, seq, 1]"),
    ("ln_final.hook_normalized", "final LayerNorm output (the unembedding's input)", "[batch, seq, d]"),
]


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{t\}", r"\d+").replace(r"\{u\}", r"\d+") + "$")


def table_row(hook_name: str) -> tuple[str, str, str]:
    """The HOOK_TABLE row whose pattern matches `hook_name` (KeyError if none)."""
    for row in HOOK_TABLE:
        if _pattern_regex(row[0]).match(hook_name):
            return row
    raise KeyError(f"hook {hook_name!r} is not documented in HOOK_TABLE")


def hook_table_markdown() -> str:
    """The markdown table of hook names that docs/hooks.md embeds (a test checks the page is in step)."""
    lines = ["| hook name | tensor | shape |", "|---|---|---|"]
    lines += [f"| `{name}` | {what} | {shape} |" for name, what, shape in HOOK_TABLE]
    return "\n".join(lines)


def stack_iterations(cache: Mapping[str, torch.Tensor], hook: str, n_loops: int | None = None) -> torch.Tensor:
    """Stack `loop.{t}.<hook>` for t = 0..K-1 into one [K, ...] tensor.

    `hook` is the part after `loop.{t}.`, e.g. "hook_state_out" or "mesh.hook_read_weights".
    K is read from the cache keys when not given; a missing step raises KeyError naming it.
    """
    hook = hook.removeprefix("loop.{t}.")
    if n_loops is None:
        found = [int(m.group(1)) for k in cache.keys() if (m := re.match(rf"^loop\.(\d+)\.{re.escape(hook)}$", k))]
        if not found:
            raise KeyError(f"no 'loop.{{t}}.{hook}' entries in the cache (cached: {sorted(cache.keys())[:5]}...)")
        n_loops = max(found) + 1
    missing = [f"loop.{t}.{hook}" for t in range(n_loops) if f"loop.{t}.{hook}" not in cache]
    if missing:
        raise KeyError(f"cache lacks {missing}")
    return torch.stack([cache[f"loop.{t}.{hook}"] for t in range(n_loops)])


MESH_HOOKS = ("hook_write_weights", "hook_read_weights", "hook_memory")


def state_hooks(cfg) -> list[tuple[str, str]]:
    """The states of a model config as ``[(state name, hook name)]`` in forward order.

    Recursive models (every variant with a prelude / loop / coda): the paper's ``h_emb, h^(0), ..., h^(K),
    h_out`` read from ``hook_embed``, ``loop.0.hook_state_in``, ``loop.{t}.hook_state_out``, ``coda.hook_out``.
    Vanilla models have no loop: ``h_emb`` and the residual stream after every layer
    (``blocks.{u}.hook_resid_post``), named ``layer 1`` ... ``layer L-1`` and ``h_out`` for the last one.
    """
    if cfg.is_vanilla:
        L = cfg.unrolled_depth
        names = ["h_emb"] + [f"layer {u + 1}" for u in range(L - 1)] + ["h_out"]
        return list(zip(names, ["hook_embed"] + [f"blocks.{u}.hook_resid_post" for u in range(L)]))
    return recursive_state_hooks(cfg.n_loops)


def recursive_state_hooks(n_loops: int) -> list[tuple[str, str]]:
    """``[(state name, hook name)]`` of a recursive model with K = `n_loops` loop steps."""
    return ([("h_emb", "hook_embed"), ("h^(0)", "loop.0.hook_state_in")]
            + [(f"h^({t + 1})", f"loop.{t}.hook_state_out") for t in range(n_loops)] + [("h_out", "coda.hook_out")])


def mesh_steps(cfg) -> list[tuple[str, str]]:
    """MeSH router steps ``[(step name, hook prefix)]``: ("entry", "entry.mesh"), ("loop 1", "loop.0.mesh"), ...;
    empty for other variants."""
    if cfg.is_vanilla or cfg.variant != "mesh":
        return []
    return [("entry", "entry.mesh")] + [(f"loop {t + 1}", f"loop.{t}.mesh") for t in range(cfg.n_loops)]


def state_hook_names(cfg) -> list[str]:
    """The state-level hooks of a model config (the public contract), in the order they fire."""
    if cfg.is_vanilla:
        return ["hook_embed"]
    mesh = bool(mesh_steps(cfg))
    names = ["hook_embed", "prelude.hook_out"] + [f"entry.mesh.{m}" for m in MESH_HOOKS if mesh]
    for t in range(cfg.n_loops):
        names += [f"loop.{t}.hook_state_in", f"loop.{t}.hook_core_out"]
        names += [f"loop.{t}.mesh.{m}" for m in MESH_HOOKS if mesh] + [f"loop.{t}.hook_state_out"]
    return names + ["coda.hook_out"]


def states(cache: Mapping[str, torch.Tensor], n_loops: int | None = None) -> dict[str, torch.Tensor]:
    """The paper's state sequence h_emb, h^(0), ..., h^(K), h_out from a cache of a recursive model (K read
    from the cache's ``loop.{t}.hook_state_out`` keys when not given); KeyError naming a missing hook."""
    if n_loops is None:
        n_loops = len(stack_iterations(cache, "hook_state_out"))
    missing = [hook for _, hook in recursive_state_hooks(n_loops) if hook not in cache]
    if missing:
        raise KeyError(f"cache lacks {missing} (cache every state, e.g. run_with_cache without names_filter)")
    return {name: cache[hook] for name, hook in recursive_state_hooks(n_loops)}
