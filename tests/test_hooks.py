"""Hook tests: every HookPoint fires exactly once per forward, patching one iteration changes only what
comes after it, the documented table covers every hook, and the stacking helper."""
import pytest
import torch
from conftest import model_tol, tiny_cfg

from meshprobe import build_model, stack_iterations
from meshprobe.hooks import hook_table_markdown, states, table_row


def tokens_for(cfg, batch=2):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx), generator=torch.Generator().manual_seed(0))


def test_every_hook_fires_exactly_once(any_cfg):
    model = build_model(any_cfg).eval()
    model.set_use_attn_result(True)  # blocks.{u}.attn.hook_result fires only behind TL's switch
    counts = {name: 0 for name in model.hook_dict}

    def count(x, hook):
        counts[hook.name] += 1

    model.run_with_hooks(tokens_for(any_cfg), fwd_hooks=[(lambda n: True, count)])
    assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c != 1}
    # and the unrolled per-layer hooks cover the whole unrolled depth
    assert sum(n.endswith("hook_resid_pre") for n in counts) == any_cfg.unrolled_depth


def test_state_hooks_fire_in_documented_order(any_cfg):
    model = build_model(any_cfg).eval()
    order = []
    model.run_with_hooks(tokens_for(any_cfg), fwd_hooks=[(lambda n: not n.startswith(("blocks.", "ln_final.")),
                                                           lambda x, hook: order.append(hook.name))])
    assert order == model.state_hook_names()


def test_every_hook_is_documented(any_cfg):
    model = build_model(any_cfg)
    for name in model.hook_dict:
        table_row(name)  # raises KeyError when undocumented


def test_docs_hook_table_is_generated_from_code():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "hooks.md").read_text()
    tables = [block for block in page.split("\n\n") if block.lstrip().startswith("| hook name |")]
    assert tables == [hook_table_markdown()], "docs/hooks.md hook table is stale: paste meshprobe.hooks.hook_table_markdown()"


@pytest.mark.parametrize("variant", ["base", "residual", "anchor", "anchor_emb", "dynamic_comb", "mesh"])
def test_patching_one_iteration_changes_only_what_follows(variant):
    cfg = tiny_cfg(variant=variant, layout="1+2R3+1")
    model = build_model(cfg).eval()
    tokens = tokens_for(cfg)
    with torch.no_grad():
        logits, clean = model.run_with_cache(tokens)

        def patch(x, hook):
            return x + 1.0

        patched = {}

        def save(x, hook):
            patched[hook.name] = x.clone()

        patched_logits = model.run_with_hooks(
            tokens, fwd_hooks=[("loop.1.hook_state_in", patch), (lambda n: True, save)]
        )
    assert not torch.allclose(logits, patched_logits)
    before = ["hook_embed", "prelude.hook_out", "loop.0.hook_state_in", "loop.0.hook_core_out",
              "loop.0.hook_state_out", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]
    if variant == "mesh":
        before += ["entry.mesh.hook_memory", "loop.0.mesh.hook_memory", "loop.0.mesh.hook_read_weights"]
    after = ["loop.1.hook_core_out", "loop.1.hook_state_out", "loop.2.hook_state_in", "blocks.3.hook_resid_pre",
             "blocks.5.hook_resid_post", "coda.hook_out"]
    for name in before:
        torch.testing.assert_close(patched[name], clean[name], **model_tol(clean[name], cfg),
                                   msg=f"{name} changed but precedes the patch")
    for name in after:
        assert not torch.allclose(patched[name], clean[name]), f"{name} did not change after the patch"


def test_hook_on_a_core_layer_affects_only_that_iteration():
    cfg = tiny_cfg(layout="1+2R3+1")
    model = build_model(cfg).eval()
    tokens = tokens_for(cfg)
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens)
        # blocks.3 is core layer 0 in loop step 1 (prelude 1 + step 0's 2 layers)
        seen = {}
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_mlp_out", lambda x, hook: x * 0),
                                                (lambda n: n.startswith("blocks."), lambda x, hook: seen.__setitem__(hook.name, x))])
    want = clean["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(seen["blocks.1.hook_mlp_out"], want, **model_tol(want, cfg))  # same weights, step 0
    assert not torch.allclose(seen["blocks.5.hook_mlp_out"], clean["blocks.5.hook_mlp_out"])  # step 2 sees the change


def test_stack_iterations_and_states():
    cfg = tiny_cfg(variant="mesh", layout="1+2R3+1")
    model = build_model(cfg).eval()
    _, cache = model.run_with_cache(tokens_for(cfg))
    stacked = stack_iterations(cache, "hook_state_out")
    assert stacked.shape == (3, 2, cfg.n_ctx, cfg.d_model)
    torch.testing.assert_close(stacked[1], cache["loop.1.hook_state_out"], rtol=0, atol=0)  # a copy
    memory = stack_iterations(cache, "mesh.hook_memory")
    assert memory.shape == (3, 2, cfg.mesh_slots, cfg.n_ctx, cfg.d_model)
    # h^(t+1) entering step t+1 is the state leaving step t
    torch.testing.assert_close(cache["loop.1.hook_state_in"], cache["loop.0.hook_state_out"], rtol=0, atol=0)
    s = states(cache, cfg.n_loops)
    assert list(s) == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h^(3)", "h_out"]
    with pytest.raises(KeyError, match="no 'loop"):
        stack_iterations(cache, "hook_nonexistent")


def test_activation_cache_helpers_see_unrolled_depth():
    cfg = tiny_cfg(layout="1+2R3+1")
    model = build_model(cfg).eval()
    _, cache = model.run_with_cache(tokens_for(cfg), names_filter=lambda n: "resid" in n)
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape[0] == cfg.unrolled_depth == 8


def test_readout_through_coda_reproduces_logits_and_fires_no_hook():
    cfg = tiny_cfg(layout="1+2R3+1", variant="anchor")
    model = build_model(cfg).eval()
    tokens = tokens_for(cfg)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        fired = []
        with model.hooks(fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))]):
            lens = model.readout(cache["loop.2.hook_state_out"], through_coda=True)
    torch.testing.assert_close(lens, logits, **model_tol(logits, cfg))
    assert fired == []
