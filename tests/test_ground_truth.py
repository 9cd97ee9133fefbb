"""Ground-truth analyses (meshprobe.analysis.ground_truth) on hand-made features and tiny untrained models."""
import numpy as np
import pytest
import torch

from conftest import approx_f32

from meshprobe import ModelConfig, build_model
from meshprobe.data import tasks
from meshprobe.analysis import ground_truth as gt

SPEC = tasks.parse_task("task:phop:hops=2,symbols=8,seq_len=12,mix=1")
FAST = dict(l2_grid=(1e-3,), folds=1)


def tiny(variant="base", layout="1+1R2+1"):
    torch.manual_seed(0)
    return build_model(ModelConfig(d_model=32, n_heads=2, vocab_size=10, n_ctx=13, layout=layout, variant=variant))


def one_hot(labels, classes=8, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.as_tensor(labels)
    f = torch.nn.functional.one_hot(lab.clamp(min=0), classes).float()
    return f + noise * torch.randn(*f.shape, generator=g)


def test_probe_reads_an_encoded_label_and_not_a_random_one():
    batch = tasks.eval_set(SPEC, 120)
    lab = batch.latents[:, 1]
    good = gt.probe_labels(one_hot(lab), lab, 8, **FAST)
    assert good["accuracy"] > 0.95 and good["ci"][0] <= good["accuracy"] <= good["ci"][1]
    assert good["n_test"] + good["n_train"] == int((lab >= 0).sum())  # undefined positions are not used
    noise = torch.randn(120, 13, 8, generator=torch.Generator().manual_seed(1))
    bad = gt.probe_labels(noise, lab, 8, **FAST)
    assert bad["accuracy"] < 0.4 and 0.05 < bad["chance"] < 0.4


def test_latent_map_and_retention_find_the_planted_information():
    batch = tasks.eval_set(SPEC, 120)
    states = {"carries hop 1": one_hot(batch.latents[:, 0]), "carries x_i": one_hot(batch.tokens, classes=10)}
    m = gt.latent_map(states, batch, 8, **FAST)
    assert m["states"] == list(states) and m["targets"] == ["hop_1", "hop_2"]
    acc = np.array(m["accuracy"])
    assert acc[0, 0] > 0.95 and acc[0, 1] < 0.7  # hop_2 = hop_1 only where the chain stands still
    r = gt.retention(states, batch, 8, **FAST)
    acc = np.array(r["accuracy"])
    assert r["targets"] == ["x_i", "x_{i-1}"] and acc[1, 0] > 0.95 and acc[1, 1] < 0.4


@pytest.mark.parametrize("variant, layout", [("base", "1+1R2+1"), ("mesh", "1+1R2+1"), ("vanilla", "4")])
def test_states_lens_and_patching_on_tiny_models(variant, layout):
    model = tiny(variant, layout).eval()
    batch = tasks.eval_set(SPEC, 48)
    states = gt.task_states(model, batch.tokens)
    if variant == "vanilla":
        expected = ["h_emb", "layer 1", "layer 2", "layer 3", "h_out"]
    else:
        expected = ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h_out"]
        expected += [f"slot {j}" for j in range(model.cfg.mesh_slots)] if variant == "mesh" else []
    assert list(states) == expected and all(s.shape == (48, 13, 32) for s in states.values())
    # h_emb holds exactly the token: x_i is perfectly decodable there
    ret = gt.retention({"h_emb": states["h_emb"]}, batch, 8, **FAST)
    assert ret["accuracy"][0][0] > 0.95
    lens = gt.lens_accuracy(model, states, batch.targets, 8)
    with torch.no_grad():
        final = tasks.task_accuracy(model(torch.as_tensor(batch.tokens)), batch.targets, 8)
    assert lens["h_out"] == pytest.approx(final)
    corrupt = tasks.eval_set(SPEC, 48, seed=1)
    p = gt.patching(model, batch, corrupt)
    assert p["sites"] == [s for s, _, _ in gt.patch_sites(model.cfg)] and p["positions"] > 20
    eff = dict(zip(p["sites"], p["effect"]))
    last = "layer 3" if variant == "vanilla" else "h^(2)"
    # a ratio of differences of two forwards' metrics: their rounding through the layers
    one = approx_f32(1.0, model.cfg.d_mlp, layers=model.cfg.n_layers + 1)
    assert eff[last] == one  # the coda sees only the last state: fully corrupted
    if variant == "base":
        assert eff["h^(0)"] == one  # base: everything flows through the loop state
    if variant == "mesh":
        assert any(abs(e - 1.0) > 1e-3 for s, e in eff.items() if s.startswith("slot"))


def test_analyze_task_is_json_ready():
    import json

    out = gt.analyze_task(tiny(), SPEC, n_sequences=32, **FAST)
    text = json.dumps(out)
    assert out["task"]["prefix"] == [9] and "latent_map" in text and len(out["patching"]["effect"]) == 3
