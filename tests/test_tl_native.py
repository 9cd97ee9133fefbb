"""TransformerLens's own functions (ActivationCache helpers, transformer_lens.patching) on tiny recursive and
MeSH models over the unrolled depth, the per-head hooks, and the exact looped decomposition."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_VARIANTS, all_configs, f32_tol, model_tol, perturbed_model, random_tokens, tiny_cfg
from transformer_lens import patching

from meshprobe import build_model, load_checkpoint
from meshprobe.tl.decompose import LoopedResidualError, decompose_looped, residual_breaks, state_parts
from meshprobe.model import apply_rotary

CKPT = Path(__file__).parent.parent / "checkpoints"
PER_HEAD = ["hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z"]


def cached(model, tokens, **kwargs):
    with torch.no_grad():
        return model.run_with_cache(tokens, **kwargs)


def final_resid(cache, cfg):
    return cache["coda.hook_out"] if not cfg.is_vanilla else cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]


def sum_tol(stack, width: int) -> dict:
    """Tolerance for stack.sum(0) against the model's own value: the components (each a sum of about `width`
    terms, possibly computed another way, e.g. per head) are summed in another order; the scale is the
    largest component, since components cancel into the sum."""
    return f32_tol(None, stack.shape[0] * width, scale=stack.abs().max())


# --- per-head hooks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "mesh"])
def test_per_head_hooks_on_every_unrolled_layer(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1")
    model = perturbed_model(cfg)
    tokens = random_tokens(cfg)
    b, s, h, dh = 2, cfg.n_ctx, cfg.n_heads, cfg.d_head
    _, cache = cached(model, tokens)
    assert "blocks.0.attn.hook_result" not in cache.keys()  # behind the switch, as in TransformerLens
    model.set_use_attn_result(True)
    _, cache = cached(model, tokens)
    cos, sin = model.rotary_cos[:s], model.rotary_sin[:s]
    for u in range(cfg.unrolled_depth):
        for name in PER_HEAD:
            assert cache[f"blocks.{u}.attn.{name}"].shape == (b, s, h, dh), name
        assert cache[f"blocks.{u}.attn.hook_pattern"].shape == (b, h, s, s)
        assert cache[f"blocks.{u}.attn.hook_result"].shape == (b, s, h, cfg.d_model)
        q = cache[f"blocks.{u}.attn.hook_q"]
        rotated = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)
        torch.testing.assert_close(cache[f"blocks.{u}.attn.hook_rot_q"], rotated, **f32_tol(rotated, 2))
        assert not torch.allclose(cache[f"blocks.{u}.attn.hook_rot_q"], q)  # rotary really applied
        scale = cache[f"blocks.{u}.hook_resid_pre"].var(-1, keepdim=True, unbiased=False).add(cfg.layer_norm_eps).sqrt()
        torch.testing.assert_close(cache[f"blocks.{u}.ln1.hook_scale"], scale, **f32_tol(scale, cfg.d_model))
        # pattern @ v = z, per head
        z = cache[f"blocks.{u}.attn.hook_pattern"] @ cache[f"blocks.{u}.attn.hook_v"].transpose(1, 2)
        torch.testing.assert_close(z.transpose(1, 2), cache[f"blocks.{u}.attn.hook_z"],
                                   **f32_tol(z, cfg.n_ctx + cfg.d_head))  # softmax of q.k, then over keys


def test_weight_views_are_the_tied_weights():
    cfg = tiny_cfg(layout="1+2R3+1")
    model = build_model(cfg)
    # unrolled layers 1, 3, 5 run core layer 0
    for u in (1, 3, 5):
        assert model.blocks[u].attn.W_O.data_ptr() == model.core.layers[0].attn.out.weight.data_ptr()
    assert model.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_U.shape == (cfg.d_model, cfg.vocab_size)
    assert set(model.state_dict()) == set(build_model(cfg).state_dict())  # views add no state


def test_fast_path_when_idle_and_every_path_gives_the_same_logits(monkeypatch):
    cfg = tiny_cfg(variant="mesh", layout="1+2R3+1")
    model = perturbed_model(cfg)
    tokens = random_tokens(cfg)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        fast = model(tokens)
        assert len(calls) == cfg.unrolled_depth  # fused kernel on every unrolled layer
        calls.clear()
        z_only = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda x, hook: x)])
        assert len(calls) == cfg.unrolled_depth  # z / q / k / v hooks keep the fused kernel
        calls.clear()
        model.set_use_attn_result(True)
        everything = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: x)])
        assert len(calls) == 0  # pattern / scores hooked: explicit attention everywhere
    for other in (z_only, everything):
        torch.testing.assert_close(other, fast, **model_tol(fast, cfg))


@pytest.mark.parametrize("variant", ["residual", "mesh"])
def test_head_results_sum_to_attn_out_minus_bias(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1")
    model = perturbed_model(cfg)
    tokens = random_tokens(cfg)
    _, plain = cached(model, tokens)
    plain.compute_head_results()  # TL's own: hook_z @ blocks[u].attn.W_O
    model.set_use_attn_result(True)
    _, hooked = cached(model, tokens)
    for u in range(cfg.n_layers):
        want = plain[f"blocks.{u}.hook_attn_out"] - model.blocks[u].attn.b_O
        for result in (hooked[f"blocks.{u}.attn.hook_result"], plain[f"blocks.{u}.attn.hook_result"]):
            torch.testing.assert_close(result.sum(-2), want, **sum_tol(result.transpose(0, -2), cfg.d_head))


def test_hook_z_inside_one_loop_step_changes_only_that_iteration():
    cfg = tiny_cfg(variant="mesh", layout="1+2R3+1")
    model = perturbed_model(cfg)
    tokens = random_tokens(cfg)
    _, clean = cached(model, tokens)

    def zero_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    # blocks.4 is core layer 1 in loop step 1
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.4.attn.hook_z", zero_head)]):
        _, patched = model.run_with_cache(tokens)
    for name in ["blocks.2.attn.hook_z", "blocks.4.attn.hook_q", "loop.0.hook_state_out", "blocks.2.hook_attn_out",
                 "blocks.4.hook_mlp_out"]:
        torch.testing.assert_close(patched[name], clean[name], **model_tol(clean[name], cfg), msg=name)
    assert torch.equal(patched["blocks.4.attn.hook_z"][:, :, 1], torch.zeros_like(clean["blocks.4.attn.hook_z"][:, :, 1]))
    for name in ["blocks.4.hook_attn_out", "loop.1.hook_core_out", "loop.1.hook_state_out", "blocks.6.attn.hook_z"]:
        assert not torch.allclose(patched[name], clean[name]), name
    # the same core head in step 2 (blocks.6) is not zeroed: the hook hit one iteration only
    assert patched["blocks.6.attn.hook_z"][:, :, 1].abs().sum() > 0


# --- the looped decomposition -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", all_configs(), ids=lambda c: f"{c.layout}-{c.variant}")
def test_decompose_looped_sums_back_at_every_layer(cfg):
    model = perturbed_model(cfg)
    _, cache = cached(model, random_tokens(cfg))
    for layer in range(cfg.n_layers + 1):
        want = cache[f"blocks.{layer}.hook_resid_pre"] if layer < cfg.n_layers else final_resid(cache, cfg)
        for heads in (False, True):
            stack, labels = decompose_looped(cache, layer, heads=heads)
            assert stack.shape[0] == len(labels) == len(set(labels))
            torch.testing.assert_close(stack.sum(0), want, **sum_tol(stack, cfg.d_model), msg=f"layer {layer} heads {heads}")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_state_parts_sum_to_the_next_state(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1")
    model = perturbed_model(cfg)
    _, cache = cached(model, random_tokens(cfg))
    expected = {"base": {"core_out"}, "residual": {"core_out", "carried"}, "anchor": {"core_out", "anchor"},
                "mesh": {f"slot{b}" for b in range(cfg.mesh_slots or 0)}}
    for t in range(cfg.n_loops):
        parts = state_parts(cache, t)
        if variant in expected:
            assert set(parts) == expected[variant]
        # each part a product, summed over the parts (a mesh slot's over the loop steps that wrote it)
        stack = torch.stack(list(parts.values()))
        torch.testing.assert_close(stack.sum(0), cache[f"loop.{t}.hook_state_out"], **sum_tol(stack, cfg.n_loops + 1))
    if variant == "mesh":
        stack = torch.stack(list(state_parts(cache, "entry").values()))
        torch.testing.assert_close(stack.sum(0), cache["loop.0.hook_state_in"], **sum_tol(stack, 1))


@pytest.mark.parametrize("variant", ["base", "vanilla"])
def test_tl_decompositions_where_the_residual_is_a_plain_sum(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1" if variant == "base" else "8")
    model = perturbed_model(cfg)
    _, cache = cached(model, random_tokens(cfg))
    assert residual_breaks(cfg) == []
    want = final_resid(cache, cfg)
    tl_stack, tl_labels = cache.decompose_resid(return_labels=True)
    ours, labels = decompose_looped(cache)
    assert tl_labels == labels
    torch.testing.assert_close(tl_stack, ours, rtol=0, atol=0)  # the same cached components
    torch.testing.assert_close(tl_stack.sum(0), want, **sum_tol(tl_stack, 1))
    full = cache.get_full_resid_decomposition()  # heads, neurons, embed, accumulated biases
    torch.testing.assert_close(full.sum(0), want, **sum_tol(full, cfg.d_head))
    heads = cache.stack_head_results(incl_remainder=True)
    assert heads.shape[0] == cfg.n_layers * cfg.n_heads + 1
    torch.testing.assert_close(heads.sum(0), want, **sum_tol(heads, cfg.d_head))
    # apply_ln_to_stack: LN(sum) == sum of the scaled components, up to LN's weight and bias
    parts = cache.apply_ln_to_stack(tl_stack, layer=-1) * model.ln_final.weight
    scaled = parts.sum(0) + model.ln_final.bias
    torch.testing.assert_close(scaled, cache["ln_final.hook_normalized"], **sum_tol(parts, cfg.d_model))


@pytest.mark.parametrize("variant", ["residual", "anchor", "dynamic_comb", "mesh"])
def test_tl_residual_sums_refuse_past_a_loop_mix(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1")
    model = perturbed_model(cfg)
    _, cache = cached(model, random_tokens(cfg))
    first = residual_breaks(cfg)[0]
    for call in (cache.decompose_resid, cache.get_full_resid_decomposition, cache.stack_head_results):
        with pytest.raises(LoopedResidualError, match="decompose_looped") as info:
            call()
        assert "\n" not in str(info.value)
    # up to the layer before the first mix TL's own answer is right, and equals ours
    tl_stack = cache.decompose_resid(layer=first - 1)
    torch.testing.assert_close(tl_stack, decompose_looped(cache, first - 1)[0], rtol=0, atol=0)  # cached values
    torch.testing.assert_close(tl_stack.sum(0), cache[f"blocks.{first - 1}.hook_resid_pre"], **sum_tol(tl_stack, 1))
    assert cache.accumulated_resid().shape[0] == cfg.n_layers + 1  # coda present: its entries are cached values


@pytest.mark.parametrize("variant", ["base", "residual", "mesh", "static_comb"])
def test_tl_logit_attrs_of_the_looped_decomposition_sum_to_the_logit(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1")
    model = perturbed_model(cfg)
    tokens = random_tokens(cfg)
    logits, cache = cached(model, tokens)
    stack, _ = decompose_looped(cache, heads=True)
    answer = tokens.roll(-1, dims=1)  # [batch, pos]: the next token at every position
    attrs = cache.logit_attrs(stack, answer)  # TL's own function
    want = logits.gather(-1, answer[..., None])[..., 0] - (model.ln_final.bias @ model.W_U)[answer]
    torch.testing.assert_close(attrs.sum(0), want, **sum_tol(attrs, cfg.d_model))  # each attr: LN, then a dot product


# --- transformer_lens.patching ----------------------------------------------------------------------------
@pytest.mark.slow
def test_tl_head_and_resid_patching_agree_with_manual_patches():
    cfg = tiny_cfg(variant="mesh", layout="1+2R2+1", n_ctx=6)
    model = perturbed_model(cfg)
    clean_tokens, corrupted = random_tokens(cfg, seed=1), random_tokens(cfg, seed=2)
    _, clean = cached(model, clean_tokens)

    def metric(logits):
        return logits[:, -1, 3].mean()

    with torch.no_grad():
        heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean, metric)
        resid = patching.get_act_patch_resid_pre(model, corrupted, clean, metric)
        by_pos = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean, metric)
    assert heads.shape == (cfg.n_layers, cfg.n_heads)
    assert resid.shape == (cfg.n_layers, cfg.n_ctx)
    assert by_pos.shape == (cfg.n_layers, cfg.n_ctx, cfg.n_heads)

    def manual(name, index):
        def hook(x, hook):
            x = x.clone()
            x[index] = clean[name][index]
            return x
        with torch.no_grad():
            return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))

    everything = slice(None)
    tol = model_tol(None, cfg, scale=heads.abs().max())  # a metric of the logits, patched and run again
    for u, h in [(0, 1), (2, 0), (4, 3)]:  # prelude, loop step 0, loop step 1 (same weights as u=2)
        torch.testing.assert_close(heads[u, h], manual(f"blocks.{u}.attn.hook_z", (everything, everything, h)), **tol)
        torch.testing.assert_close(by_pos[u, 2, h], manual(f"blocks.{u}.attn.hook_z", (everything, 2, h)), **tol)
    for u, pos in [(1, 4), (3, 5)]:
        torch.testing.assert_close(resid[u, pos], manual(f"blocks.{u}.hook_resid_pre", (everything, pos)), **tol)
    assert not torch.allclose(heads[2], heads[4])  # the two iterations of the same core layer differ


# --- the bundled checkpoints: every call of the TransformerLens tool table ----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["loop3-base", "loop3-residual", "loop3-anchor", "loop3-mesh", "loop3-vanilla"])
def test_tool_table_on_bundled_checkpoints(name):
    model = load_checkpoint(CKPT / name).eval()
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    logits, cache = cached(model, tokens)
    plain = residual_breaks(cfg) == []
    assert cache.stack_activation("resid_post").shape[0] == cfg.n_layers == 8
    assert cache.accumulated_resid().shape[0] == 9
    for call in (cache.decompose_resid, cache.stack_head_results, cache.get_full_resid_decomposition):
        if plain:
            assert call().shape[-1] == cfg.d_model
        else:
            with pytest.raises(LoopedResidualError, match=r"meshprobe\.tl\.decompose\.decompose_looped"):
                call()
    stack, labels = decompose_looped(cache, heads=True)
    torch.testing.assert_close(stack.sum(0), final_resid(cache, cfg), **sum_tol(stack, cfg.d_model))
    assert len([lab for lab in labels if lab.startswith("L")]) == cfg.n_layers * cfg.n_heads
    with torch.no_grad():
        out = patching.get_act_patch_attn_head_out_all_pos(model, tokens.flip(0), cache, lambda lg: lg[:, -1, 0].mean())
    assert out.shape == (8, cfg.n_heads)
