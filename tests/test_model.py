"""Model tests: shapes, causality, equations (against a hand-written unrolled reference), parameter counts,
config validation, and the vanilla layer against HF's GPT-NeoX (Pythia) implementation."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import f32_tol, model_tol, random_model, random_tokens, tiny_cfg

from meshprobe import ModelConfig, UserError, build_model


# ----------------------------------------------------------------------------------------------------------
# A reference written straight from the equations (paper §1), independent of the model's forward code.
# ----------------------------------------------------------------------------------------------------------
def ref_layer(x, layer, cfg):
    b, s, d = x.shape
    h, dh, r = cfg.n_heads, cfg.d_head, cfg.rotary_dims
    a = F.layer_norm(x, (d,), layer.ln_attn.weight, layer.ln_attn.bias, cfg.layer_norm_eps)
    qkv = a @ layer.attn.qkv.weight.T + layer.attn.qkv.bias
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, s, h, dh).transpose(1, 2) for i in range(3))
    pos = torch.arange(s, dtype=torch.float32)
    freqs = torch.stack([pos / cfg.rotary_base ** (2 * j / r) for j in range(r // 2)], dim=-1)  # [s, r/2]

    def rotate(t):
        t1, t2, rest = t[..., : r // 2], t[..., r // 2:r], t[..., r:]
        c, sn = freqs.cos(), freqs.sin()
        return torch.cat([t1 * c - t2 * sn, t2 * c + t1 * sn, rest], dim=-1)

    q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    attn = z @ layer.attn.out.weight.T + layer.attn.out.bias
    m = F.layer_norm(x, (d,), layer.ln_mlp.weight, layer.ln_mlp.bias, cfg.layer_norm_eps)
    mlp = F.gelu(m @ layer.mlp.up.weight.T + layer.mlp.up.bias) @ layer.mlp.down.weight.T + layer.mlp.down.bias
    return x + attn + mlp


def ref_stack(x, stack, cfg):
    for layer in stack:
        x = ref_layer(x, layer, cfg)
    return x


def ref_router(x, linear):
    return torch.softmax(x @ linear.weight.T + linear.bias, dim=-1)  # [b, s, B]


def ref_forward(model, tokens):
    cfg = model.cfg
    h_emb = model.embed.weight[tokens] * (math.sqrt(cfg.d_model) if cfg.embed_scale != 1.0 else 1.0)
    if cfg.is_vanilla:
        h_out = ref_stack(h_emb, model.layers, cfg)
    else:
        p = ref_stack(h_emb, model.prelude.layers, cfg)
        if cfg.variant == "mesh":
            B = cfg.mesh_slots
            slots = [h_emb] + [torch.zeros_like(h_emb) for _ in range(B - 1)]

            def cycle(router_in, written, mesh):
                ww, wr = ref_router(router_in, mesh.write_router), ref_router(router_in, mesh.read_router)
                for i in range(B):
                    slots[i] = slots[i] + ww[..., i:i + 1] * written
                return sum(wr[..., i:i + 1] * slots[i] for i in range(B))

            h = cycle(p, p, model.entry.mesh)
        else:
            h = p
        h0 = h
        for t in range(cfg.n_loops):
            core = model.core.layers if cfg.shared else model.blocks_weights[t].layers
            f = ref_stack(h, core, cfg)
            v = cfg.variant
            if v == "mesh":
                h_next = cycle(h, f, model.loop[t].mesh)
            elif v == "static_comb":
                a = model.loop[t].comb
                h_next = a[0] * f + a[1] * h0 + a[2] * h_emb
            elif v == "dynamic_comb":
                a = h @ model.loop[t].comb.weight.T + model.loop[t].comb.bias
                h_next = a[..., 0:1] * f + a[..., 1:2] * h0 + a[..., 2:3] * h_emb
            else:
                terms = set(v.split("+")) - {"base"}
                h_next = f + ("residual" in terms) * h + ("anchor" in terms) * h0 + ("anchor_emb" in terms) * h_emb
            h = h_next
        h_out = ref_stack(h, model.coda.layers, cfg)
    x = F.layer_norm(h_out, (cfg.d_model,), model.ln_final.weight, model.ln_final.bias, cfg.layer_norm_eps)
    return x @ model.unembed.weight.T


def test_forward_matches_hand_written_equations(any_cfg):
    model = random_model(any_cfg)
    tokens = random_tokens(any_cfg)
    with torch.no_grad():
        got, want = model(tokens), ref_forward(model, tokens)
    assert got.shape == (2, any_cfg.n_ctx, any_cfg.vocab_size)
    torch.testing.assert_close(got, want, **model_tol(want, any_cfg))


def test_explicit_attention_path_equals_fused(any_cfg):
    """Hooking the attention pattern switches to explicit attention; the logits must not change."""
    model = random_model(any_cfg)
    tokens = random_tokens(any_cfg)
    with torch.no_grad():
        fused = model(tokens)
        explicit = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: x)])
    torch.testing.assert_close(fused, explicit, **model_tol(fused, any_cfg))


def test_causal(any_cfg):
    model = random_model(any_cfg)
    tokens = random_tokens(any_cfg, batch=1)
    changed = tokens.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % any_cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], **model_tol(a, any_cfg))
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_loss_and_gradients_flow(any_cfg):
    model = build_model(any_cfg)
    loss = model(random_tokens(any_cfg), return_type="loss")
    assert abs(loss.item() - math.log(any_cfg.vocab_size)) < 1.0  # near-uniform at init
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_too_long_sequence_is_rejected():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="n_ctx"):
        build_model(cfg)(torch.zeros(1, cfg.n_ctx + 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Parameter fidelity (paper Table 5), built on the meta device.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout, variant, slots, non_embedding, router",
    [
        ("24", "vanilla", None, 1_208_602_624, 0),
        ("4+8R2+4", "base", None, 805_736_448, 0),
        ("4+8R2+4", "mesh", 5, 805_797_918, 61_470),
    ],
)
def test_pythia_1p4b_parameter_counts(layout, variant, slots, non_embedding, router):
    cfg = ModelConfig(d_model=2048, n_heads=16, vocab_size=50304, n_ctx=2048, layout=layout, variant=variant,
                      mesh_slots=slots)
    counts = build_model(cfg, device="meta").parameter_counts()
    assert counts["non_embedding"] == non_embedding
    assert counts["router"] == router


def test_core_weights_are_tied_and_stored_once():
    model = build_model(tiny_cfg(layout="1+2R3+1"))
    core_keys = [k for k in model.state_dict() if k.startswith("core.")]
    assert len([k for k in core_keys if k.endswith("attn.qkv.weight")]) == 2  # 2 core layers, not 6
    assert not any("blocks." in k for k in model.state_dict())  # hook holders carry no weights


def test_mesh_default_slots_and_depth_aware_init():
    cfg = tiny_cfg(variant="mesh", layout="3+6R3+3", d_model=64)
    assert cfg.mesh_slots == 6  # B = K + 3
    model = build_model(cfg)
    out_std = model.core.layers[0].mlp.down.weight.std().item()
    in_std = model.core.layers[0].mlp.up.weight.std().item()
    assert in_std == pytest.approx(0.02, rel=0.1)
    assert out_std == pytest.approx(0.02 / math.sqrt(2 * 21), rel=0.1)  # unrolled depth 3 + 18 + 3


def test_router_zero_init_gives_uniform_routing():
    cfg = tiny_cfg(variant="mesh", router_init="zeros")
    model = build_model(cfg)
    _, cache = model.run_with_cache(random_tokens(cfg), names_filter=lambda n: n.endswith("weights"))
    for name, w in cache.items():
        torch.testing.assert_close(w, torch.full_like(w, 1 / cfg.mesh_slots), **f32_tol(1.0, cfg.mesh_slots))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="mesh", mesh_slots=1), "at least 2"),
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(layout="3+6X3+3"), "does not parse"),
        (dict(layout="24", variant="mesh"), "looped layout"),
        (dict(layout="3+6R3+3", variant="vanilla"), "no shared core"),
        (dict(variant="anchorx"), "unknown variant"),
        (dict(variant="base", mesh_slots=4), "only for variant 'mesh'"),
        (dict(layout="1+2R0+1"), ">= 1"),
        (dict(router_init="xavier"), "router_init"),
    ],
)
def test_invalid_configs_say_what_to_change(kwargs, message):
    with pytest.raises(UserError, match=message):
        tiny_cfg(**kwargs)


def test_variant_spellings_are_canonical():
    assert tiny_cfg(variant="anchor+residual").variant == "residual+anchor"
    assert tiny_cfg(variant="anchor*").variant == "anchor_emb"


def test_vanilla_layer_matches_hf_gpt_neox():
    """Our vanilla model is Pythia: copy weights into HF's GPTNeoXForCausalLM and compare logits."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(variant="vanilla", layout="3")
    ours = random_model(cfg)
    hf_cfg = transformers.GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=3, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp, hidden_act="gelu", rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base,
        max_position_embeddings=cfg.n_ctx, layer_norm_eps=cfg.layer_norm_eps, use_parallel_residual=True,
        tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0,
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    unembed_key = "embed_out.weight" if "embed_out.weight" in hf.state_dict() else "lm_head.weight"  # renamed in 5.x
    sd = {"gpt_neox.embed_in.weight": ours.embed.weight, unembed_key: ours.unembed.weight,
          "gpt_neox.final_layer_norm.weight": ours.ln_final.weight, "gpt_neox.final_layer_norm.bias": ours.ln_final.bias}
    for i, layer in enumerate(ours.layers):
        pre = f"gpt_neox.layers.{i}."
        # ours: qkv rows ordered (q|k|v, head, d_head); HF: (head, q|k|v, d_head)
        w = layer.attn.qkv.weight.view(3, h, dh, d).transpose(0, 1).reshape(3 * d, d)
        bias = layer.attn.qkv.bias.view(3, h, dh).transpose(0, 1).reshape(3 * d)
        sd.update({
            pre + "input_layernorm.weight": layer.ln_attn.weight, pre + "input_layernorm.bias": layer.ln_attn.bias,
            pre + "post_attention_layernorm.weight": layer.ln_mlp.weight,
            pre + "post_attention_layernorm.bias": layer.ln_mlp.bias,
            pre + "attention.query_key_value.weight": w, pre + "attention.query_key_value.bias": bias,
            pre + "attention.dense.weight": layer.attn.out.weight, pre + "attention.dense.bias": layer.attn.out.bias,
            pre + "mlp.dense_h_to_4h.weight": layer.mlp.up.weight, pre + "mlp.dense_h_to_4h.bias": layer.mlp.up.bias,
            pre + "mlp.dense_4h_to_h.weight": layer.mlp.down.weight, pre + "mlp.dense_4h_to_h.bias": layer.mlp.down.bias,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    tokens = random_tokens(cfg)
    with torch.no_grad():
        want = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), want, **model_tol(want, cfg))


# ----------------------------------------------------------------------------------------------------------
# MeSH: the fast (written-values) read equals the materialized buffer, which a hook on hook_memory forces.
# ----------------------------------------------------------------------------------------------------------
MESH_CFGS = [tiny_cfg(variant="mesh"), tiny_cfg(variant="mesh", layout="1+2+2+1"),
             tiny_cfg(variant="mesh", layout="0+2R2+0", mesh_slots=2)]


def _loss_and_grads(model, tokens, fwd_hooks=()):
    model.zero_grad(set_to_none=True)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        logits, loss = model(tokens, return_type="both")
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", MESH_CFGS, ids=lambda c: c.layout)
def test_mesh_fast_read_equals_materialized_buffer(cfg):
    model = random_model(cfg).train()
    tokens = random_tokens(cfg)
    seen = []
    identity = [(lambda n: n.endswith("mesh.hook_memory"), lambda x, hook: seen.append(x.shape) or x)]
    fast_logits, fast_grads = _loss_and_grads(model, tokens)
    dense_logits, dense_grads = _loss_and_grads(model, tokens, identity)
    assert seen == [(2, cfg.mesh_slots, cfg.n_ctx, cfg.d_model)] * (cfg.n_loops + 1)  # the dense path ran
    torch.testing.assert_close(fast_logits, dense_logits, **model_tol(dense_logits, cfg))
    assert fast_grads.keys() == dense_grads.keys()
    scale = max(g.abs().max().item() for g in dense_grads.values())  # some gradients cancel to ~0
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], dense_grads[name], **model_tol(None, cfg, scale=scale), msg=name)


def _grads_of_states(model, tokens, names, fwd_hooks=(), repeat=1):
    """torch.autograd.grad of the loss w.r.t. the named state hooks' outputs (a partial backward), `repeat`
    times on one graph (retain_graph)."""
    states = {}

    def keep(x, hook):
        states[hook.name] = x
        return x

    with model.hooks(fwd_hooks=[*fwd_hooks, *((n, keep) for n in names)]):
        loss = model(tokens, return_type="loss")
    return [torch.autograd.grad(loss, [states[n] for n in names], retain_graph=True) for _ in range(repeat)]


def test_mesh_chained_read_partial_and_repeated_backward():
    """The chained read is a pure function of the graph: a partial autograd.grad (w.r.t. intermediate states
    only) and a second backward on the same graph give the dense buffer's gradients."""
    cfg = tiny_cfg(variant="mesh")
    model = random_model(cfg).train()
    tokens = random_tokens(cfg)
    names = ["prelude.hook_out", "loop.0.hook_core_out", "loop.1.hook_state_in"]
    first, second = _grads_of_states(model, tokens, names, repeat=2)
    identity = [(lambda n: n.endswith("mesh.hook_memory"), lambda x, hook: x)]
    (dense,) = _grads_of_states(model, tokens, names, fwd_hooks=identity)
    for name, a, b, c in zip(names, first, second, dense):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(a, c, **model_tol(c, cfg), msg=name)


def test_mesh_memory_hook_edits_flow_into_reads_and_later_writes():
    """An edit of entry.mesh.hook_memory is carried into later steps' buffers; an edit of the last step's
    buffer changes its read h^(K) exactly as sum_b r_b m_b of the edited slots."""
    cfg = tiny_cfg(variant="mesh")
    model = random_model(cfg)
    tokens = random_tokens(cfg)
    K = cfg.n_loops
    last = f"loop.{K - 1}.mesh"

    def bump(x, hook):
        x = x.clone()
        x[:, 1] += 1.0
        return x

    def zero_slot0(x, hook):
        x = x.clone()
        x[:, 0] = 0.0
        return x

    with torch.no_grad():
        clean, clean_cache = model.run_with_cache(tokens)
        with model.hooks(fwd_hooks=[("entry.mesh.hook_memory", bump)]):
            bumped, cache = model.run_with_cache(tokens)
        assert not torch.allclose(clean, bumped)
        # step 0's buffer = the bumped entry buffer + step 0's write
        w0 = cache["loop.0.mesh.hook_write_weights"]
        want = cache["entry.mesh.hook_memory"] + w0.transpose(1, 2).unsqueeze(-1) * cache["loop.0.hook_core_out"].unsqueeze(1)
        torch.testing.assert_close(cache["loop.0.mesh.hook_memory"], want, **f32_tol(want, 2))  # one product, one sum
        torch.testing.assert_close(cache["entry.mesh.hook_memory"], bump(clean_cache["entry.mesh.hook_memory"], None),
                                   rtol=0, atol=0)  # the same function of the same tensor

        with model.hooks(fwd_hooks=[(f"{last}.hook_memory", zero_slot0)]):
            zeroed, cache = model.run_with_cache(tokens)
        assert not torch.allclose(clean, zeroed)
        memory = zero_slot0(clean_cache[f"{last}.hook_memory"], None)
        want = torch.einsum("bsn,bnsd->bsd", clean_cache[f"{last}.hook_read_weights"], memory)
        torch.testing.assert_close(cache[f"loop.{K - 1}.hook_state_out"], want, **f32_tol(want, cfg.mesh_slots))
