"""The loop crosscoder (meshprobe.features): planted features recovered with their spans, the L1 artefact that
BatchTopK avoids, streaming memory flat in N, save / load, sources and ablations on a model, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import NO_TORCH_SCRIPT, random_model, random_tokens, tiny_cfg
from meshprobe.errors import UserError
from meshprobe.features import (FeatureStats, LoopCrosscoder, lifetimes, load_crosscoder, planted_features, recovery,
                                shuffled, source_spec, summary, train_crosscoder)
from meshprobe.features.causal import ablation_effects
from meshprobe.features.sources import iter_rows

REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=400, batch_size=256, lr=1e-2)  # planted data: 4 sources x 16 dims, 24 features


def _match(cc: LoopCrosscoder, planted):
    """Best learned feature per planted one by cosine of the whole decoder (every source, normalised space)."""
    true = torch.nn.functional.normalize((planted.directions * cc.scale[None, :, None]).flatten(1), dim=1)
    learned = torch.nn.functional.normalize(cc.W_dec.detach().flatten(1), dim=1)
    return (true @ learned.T).max(1)


@pytest.fixture(scope="module")
def planted():
    return planted_features(n_rows=8192, n_sources=4, d=16, n_true=24, active=3, seed=0)


@pytest.fixture(scope="module")
def trained(planted):
    return train_crosscoder(planted.acts, 32, 3, seed=0, **FAST)


def test_planted_features_recovered_with_exact_spans(planted, trained):
    assert sorted(set(planted.scales.tolist())) == [0.25, 1.0, 4.0]  # sources 16x apart
    cos, idx = _match(trained, planted)
    life = lifetimes(trained.profile()[idx])
    rec = recovery(trained, planted)
    assert rec["match"] == idx.tolist()
    exact = [bool(cos[j] >= 0.9) and life["birth"][j] == int(planted.births[j]) and
             life["death"][j] == int(planted.deaths[j]) for j in range(len(cos))]
    assert sum(exact) >= 0.9 * len(exact), (cos, life, planted.births, planted.deaths)
    assert rec["recovered"] == sum(exact) / len(exact)
    # every lifetime kind is among the planted ones, and the recovered classes follow the spans
    spans = (planted.deaths - planted.births).tolist()
    classes = [life["class"][j] for j in range(len(cos)) if exact[j]]
    assert {"persistent", "step-specific", "transient"} <= set(classes)
    assert all((c == "persistent") == (s == 3) for c, s, e in zip(life["class"], spans, exact) if e)


def test_decoder_in_units_of_acts_and_codes(planted, trained):
    cos, idx = _match(trained, planted)
    good = cos >= 0.9
    # the decoder in the units of acts points like the planted directions, source by source, at the planted scale
    dec = trained.decoder[idx[good]]  # [m, S, d]
    true = planted.directions[good]
    on = true.norm(dim=-1) > 0
    per_source = torch.nn.functional.cosine_similarity(dec, true, dim=-1)[on]
    assert float(per_source.median()) > 0.95
    codes = trained.encode(planted.acts)
    assert codes.shape == (planted.acts.shape[0], 32) and bool((codes >= 0).all())
    assert 2 <= float((codes > 0).sum(1).float().mean()) <= 4.5  # k = 3 on average (threshold at inference)
    recon = trained.decode(codes)
    fvu = (recon - planted.acts).pow(2).sum((0, 2)) / (planted.acts - planted.acts.mean(0)).pow(2).sum((0, 2))
    assert bool((fvu < 0.1).all()), fvu  # every source, whatever its scale
    prof = trained.profile()
    assert prof.shape == (32, 4)
    assert torch.allclose(prof.pow(2).sum(1), torch.ones(32), atol=1e-4)  # unit-norm decoders


@pytest.mark.slow
def test_l1_shrinks_the_weak_source_and_latent_scaling_flags_it():
    """A feature weak in one source of its span: BatchTopK keeps that source's decoder at the planted size,
    the L1 crosscoder shrinks it towards 0 (complete shrinkage), and Latent Scaling flags the L1 features."""
    p = planted_features(n_rows=8192, n_sources=4, d=16, n_true=24, active=3, seed=0, weak=0.3)
    weak_feats = [j for j in range(24) if p.deaths[j] > p.births[j]]
    out = {}
    for method in ("batchtopk", "l1"):
        cc = train_crosscoder(p.acts, 32, 3, method=method, l1_coef=0.3, **FAST)
        cos, idx = _match(cc, p)
        prof = cc.profile()[idx]
        true = (p.directions * cc.scale[None, :, None]).norm(dim=-1)
        ratio = [float(prof[j, p.births[j] + 1] / prof[j].max()) / float(true[j, p.births[j] + 1] / true[j].max())
                 for j in weak_feats]
        acc = FeatureStats(cc)
        acc.update(p.acts, torch.zeros(p.acts.shape[0], 2, dtype=torch.long))
        res = acc.result()
        out[method] = (torch.tensor(ratio), int(res["artefact"].sum()), res["l0"])
    btk, l1 = out["batchtopk"], out["l1"]
    assert abs(float(btk[0].median()) - 1) < 0.2, btk[0]  # BatchTopK: the weak source at its planted size
    assert float(l1[0].median()) < 0.6, l1[0]  # L1: shrunk
    assert l1[1] >= 3 and btk[1] == 0, (l1[1], btk[1])
    assert l1[2] < 2 * btk[2]  # at comparable sparsity


@pytest.mark.slow
def test_auxk_revives_dead_features(planted):
    """Features silent for dead_after rows are trained on the residual error (AuxK): fewer dead features, a
    better fit and more planted features found than with the auxiliary loss off."""
    runs = {}
    for aux in (0.0, 1 / 32):
        cc = train_crosscoder(planted.acts, 32, 3, seed=0, aux_coef=aux, dead_after=1024, **FAST)
        dead = float((cc.encode(planted.acts).sum(0) == 0).float().mean())
        runs[aux] = (dead, cc.meta["training"]["final_fvu"], recovery(cc, planted)["recovered"])
    assert runs[1 / 32][0] < runs[0.0][0] and runs[1 / 32][1] < runs[0.0][1], runs
    assert runs[1 / 32][2] >= 0.9 and runs[1 / 32][2] > runs[0.0][2], runs


def test_lifetime_classes_and_summary():
    profile = torch.tensor([[1.0, 1.0, 0.9, 0.0, 0.0],   # persistent over the 3 loop states
                            [0.0, 1.0, 0.05, 0.0, 0.0],  # step-specific at h^(1)
                            [1.0, 0.0, 0.5, 0.3, 0.0],   # transient h^(0)..h^(2) with a gap
                            [0.0, 0.1, 0.0, 1.0, 0.5],   # slot-only
                            [1.0, 1.0, 1.0, 1.0, 1.0]])  # dead (never fired)
    kinds = ["loop", "loop", "loop", "slot", "slot"]
    life = lifetimes(profile, kinds, alive=torch.tensor([True, True, True, True, False]))
    assert life["class"] == ["persistent", "step-specific", "transient", "slot-only", "dead"]
    assert life["birth"] == [0, 1, 0, None, 0] and life["death"] == [2, 1, 2, None, 2]
    s = summary(profile, kinds, life)
    assert s["persistent_share"] == s["step_specific_share"] == s["transient_share"] == s["slot_only_share"] == 0.25
    assert s["dead_share"] == 0.2 and s["slot_share"] == 0.5 and s["persistent_in_slots"] == 0.0


def test_shuffle_buffer_emits_each_row_once_with_bounded_memory():
    alive, peak = set(), [0]

    def chunks(n_chunks):
        for c in range(n_chunks):
            t = torch.arange(c * 300, (c + 1) * 300, dtype=torch.float32)[:, None].repeat(1, 3)
            alive.add(c)
            peak[0] = max(peak[0], len(alive))
            yield t
            alive.discard(c)  # the consumer took it: the generator resumes only when the next is asked for

    for n_chunks in (5, 50):
        peak[0] = 0
        rows = torch.cat(list(shuffled(chunks(n_chunks), buffer_rows=1000, batch_size=128, seed=1)))
        assert sorted(rows[:, 0].long().tolist()) == list(range(n_chunks * 300))  # each row once
        assert not torch.equal(rows[:, 0], torch.arange(n_chunks * 300.0))  # shuffled
        assert peak[0] == 1  # one chunk at a time, however long the stream
    with pytest.raises(UserError, match="buffer_rows"):
        list(shuffled(chunks(1), buffer_rows=10, batch_size=128))


@pytest.mark.slow
def test_streaming_training_memory_is_flat_in_n(tmp_path):
    """Training from a stream of 11x more rows (200 MB more if held at once) raises peak RSS by far less."""
    script = (
        "import resource, sys, torch\n"
        "from meshprobe.features import train_crosscoder, shuffled\n"
        "n = int(sys.argv[1]); torch.manual_seed(0)\n"
        "chunks = (torch.randn(512, 8, 128) for _ in range(n))\n"
        "train_crosscoder(shuffled(chunks, 2048, 512), 32, 4, lr=1e-3)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    peak = [int(subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, env=env,
                               check=True).stdout.split()[-1]) for n in (10, 110)]
    rows_mib = 100 * 512 * 8 * 128 * 4 / 2**20  # what the 100 extra chunks would hold
    assert peak[1] - peak[0] < 0.15 * rows_mib, (peak, rows_mib)


def test_save_and_load_round_trip(tmp_path, trained, planted):
    path = trained.save(tmp_path / "cc")
    assert sorted(p.name for p in path.iterdir()) == ["crosscoder.json", "crosscoder.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    back = load_crosscoder(path)
    assert torch.equal(back.encode(planted.acts[:100]), trained.encode(planted.acts[:100]))
    assert back.source_names == trained.source_names and back.k == 3
    trained.save(path)  # replacing an existing one
    (path / "crosscoder.json").write_text("{not json")
    with pytest.raises(UserError, match="crosscoder.json"):
        load_crosscoder(path)


def test_bad_sizes_and_input():
    acts = torch.randn(64, 2, 4)
    for n_features, k in ((8, 8), (8, 9), (8, 0)):
        with pytest.raises(UserError, match=f"k={k} must be"):
            train_crosscoder(acts, n_features, k)
    with pytest.raises(UserError, match="acts must be a float tensor"):
        train_crosscoder(torch.ones(64, 8, dtype=torch.long), 8, 2)
    with pytest.raises(UserError, match="method"):
        train_crosscoder(acts, 8, 2, method="topk")
    with pytest.raises(UserError, match="no loop"):
        source_spec(random_model(tiny_cfg(variant="vanilla", layout="5")))


@pytest.fixture(scope="module")
def mesh_model():
    return random_model(tiny_cfg(variant="mesh", mesh_slots=3))


def test_sources_of_a_mesh_model_are_its_states_and_slots(mesh_model):
    spec = source_spec(mesh_model, emb=True, out=True)
    assert spec.names == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h^(3)", "h_out", "slot 1", "slot 2", "slot 3"]
    tokens = random_tokens(mesh_model.cfg, batch=3)
    rows = list(iter_rows(mesh_model, tokens, spec, batch_size=2, skip_first=1))
    acts = torch.cat([a for a, _ in rows])
    where = torch.cat([w for _, w in rows])
    _, cache = mesh_model.run_with_cache(tokens)
    L = tokens.shape[1] - 1
    assert acts.shape == (3 * L, 9, 32)
    tol = 1e-5 * float(acts.abs().max())  # float32 rounding: batches of 2 here, of 3 in the reference
    for row in (5, 2 * L + 7):  # a row of the first batch and one of the second
        seq, pos = where[row].tolist()
        assert torch.allclose(acts[row, 3], cache["loop.1.hook_state_out"][seq, pos], rtol=0, atol=tol)
        assert torch.allclose(acts[row, 7], cache["loop.2.mesh.hook_memory"][seq, 1, pos], rtol=0, atol=tol)
        assert torch.allclose(acts[row, 0], cache["hook_embed"][seq, pos], rtol=0, atol=tol)
    assert where[:, 1].min() == 1  # the first position is skipped


def test_ablation_subtracts_the_decoder_at_its_step_only(mesh_model):
    spec = source_spec(mesh_model)
    tokens = random_tokens(mesh_model.cfg, batch=4)
    acts = torch.cat([a for a, _ in iter_rows(mesh_model, tokens, spec)])
    cc = train_crosscoder(acts, 16, 2, steps=30, batch_size=32, source_names=spec.names)
    f = int(cc.encode(acts).sum(0).argmax())
    # h^(0)'s ablation reaches the output; a feature with no decoder at h^(2) changes nothing there
    with torch.no_grad():
        cc.W_dec[f, 2] = 0
    res = ablation_effects(mesh_model, cc, spec, tokens, [f])
    assert res["sources"] == ["h^(0)", "h^(1)", "h^(2)", "h^(3)"]
    assert res["d_loss"][0][2] == 0.0 and res["d_loss"][0][0] != 0.0
    # the hook sees exactly state - code * decoder at the ablated step, upstream states unchanged
    codes = cc.encode(acts)[:, f].view(4, -1)
    seen = {}

    def record(x, hook):
        seen[hook.name] = x.clone()

    delta = codes[..., None] * cc.decoder[f, 1]

    def ablate(x, hook):
        x = x.clone()
        x[:, 1:] -= delta
        return x

    with torch.no_grad():
        _, clean = mesh_model.run_with_cache(tokens)
        mesh_model.run_with_hooks(tokens, fwd_hooks=[("loop.0.hook_state_out", ablate), ("loop.0.hook_state_out",
                                                     record), ("loop.0.hook_state_in", record)])
    tol = 1e-5 * float(clean["loop.0.hook_state_out"].abs().max())
    assert torch.allclose(seen["loop.0.hook_state_in"], clean["loop.0.hook_state_in"], rtol=0, atol=tol)
    assert torch.allclose(seen["loop.0.hook_state_out"][:, 1:], clean["loop.0.hook_state_out"][:, 1:] - delta,
                          rtol=0, atol=tol)
    assert float(delta.abs().max()) > 100 * tol  # the subtraction is not lost in the tolerance


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "meshprobe", "features", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


SMALL = ["--samples", "6", "--epochs", "1", "--features", "64", "--k", "4", "--causal", "1", "--quiet"]




def test_cli_bad_input_one_line_exit_2_nothing_written_before_torch(tmp_path):
    """A model without loops, k >= features, a saved dictionary of another model, a missing model: one line
    each, exit 2, nothing written, and torch never imported."""
    saved = tmp_path / "cc"
    LoopCrosscoder(10, 128, 16, 4, source_names=[f"h^({t})" for t in range(4)] + [f"slot {b}" for b in range(1, 7)]
                   ).save(saved)
    out = str(tmp_path / "new" / "out")
    ckpt = REPO / "checkpoints"
    cases = [["features", str(ckpt / "loop3-vanilla"), "--out", out],
             ["features", str(ckpt / "loop3-mesh"), "--out", out, "--features", "32", "--k", "32"],
             ["features", str(ckpt / "loop3-base"), "--out", out, "--k", "512"],
             ["features", str(ckpt / "loop3-base"), "--out", out, "--load", str(saved)],
             ["features", str(tmp_path / "nope"), "--out", out]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT.format(cases=cases)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(cases), lines
    for line, want in zip(lines, ["has no loop", "--k 32 must be at least 1 and below --features 32",
                                  "--k 512 must be at least 1 and below --features 512",
                                  "the crosscoder reads 10 sources", "model not found"]):
        assert line.startswith("meshprobe features: error: ") and want in line, line
    assert not (tmp_path / "new").exists()
    # the same sizes through the library
    with pytest.raises(UserError, match="k=8 must be"):
        train_crosscoder(torch.randn(16, 2, 4), 8, 8)


@pytest.mark.slow
def test_cli_trains_on_a_checkpoint_then_loads_and_refuses_a_mismatch(tmp_path):
    out = tmp_path / "out"
    r = _cli(REPO / "checkpoints/loop3-mesh", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "features.json").read_text())
    m = doc["models"][0]
    assert m["sources"][:4] == ["h^(0)", "h^(1)", "h^(2)", "h^(3)"] and m["sources"][4] == "slot 1"
    assert len(m["features"]) == 64 and set(m["fvu"]) == set(m["sources"])
    assert {"persistent_share", "step_specific_share", "slot_share"} <= set(m["summary"])
    assert m["causal"]["features"] and (out / "loop3-mesh" / "profiles.png").is_file()
    assert "## Features across loop steps" in (out / "report.md").read_text()
    saved = out / "loop3-mesh" / "crosscoder"
    again = _cli(REPO / "checkpoints/loop3-mesh", "--out", tmp_path / "again", "--load", saved, "--samples", "4",
                 "--causal", "0", "--quiet")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "features.json").read_text())["models"][0]["crosscoder"]["loaded_from"]
    bad = _cli(REPO / "checkpoints/loop3-base", "--out", tmp_path / "bad", "--load", saved, "--quiet")
    assert bad.returncode == 2 and "the crosscoder reads 10 sources" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_on_a_transformers_looped_directory_and_a_task_checkpoint(tmp_path):
    from test_hf import _dory

    torch.manual_seed(0)
    _dory().save_pretrained(tmp_path / "dory")
    import numpy as np

    np.save(tmp_path / "tokens.npy", random_tokens(tiny_cfg(vocab_size=128), batch=6, seq=16).numpy())
    r = _cli(tmp_path / "dory", "--out", tmp_path / "out", "--tokens", tmp_path / "tokens.npy", *SMALL)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "features.json").read_text())["models"][0]
    assert m["sources"] == ["h^(0)", "h^(1)", "h^(2)", "h^(3)"] and m["n_loops"] == 3
    t = _cli(REPO / "checkpoints/tasks/phop2-base", "--out", tmp_path / "task", *SMALL)
    assert t.returncode == 0, t.stderr
    m = json.loads((tmp_path / "task" / "features.json").read_text())["models"][0]
    assert m["task"]["name"] == "phop" and len(m["features"][0]["hop_purity"]) == 3  # input symbol, hop 1, hop 2
    assert set(m["hop_features"]) == {"input", "hop 1", "hop 2"}
