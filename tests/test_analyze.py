"""`meshprobe analyze`: the streaming pipeline (meshprobe.analysis.pipeline.analyze), figures, report and the CLI.

The math of the metrics and probes is tested in test_metrics.py / test_probes.py; here: wiring, output files,
documented keys, value ranges, the lens sanity check, bad input, atomic output and constant memory.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import approx_f32, f32_tol, f64_tol, model_tol

from meshprobe import ModelConfig, build_model, load_checkpoint, save_checkpoint
from meshprobe.analysis.pipeline import collect
from meshprobe.analysis.plots import diagnostics as plots
from meshprobe.analysis import metrics as M
from meshprobe.analysis.pipeline import analyze as R
from meshprobe.analysis.pipeline import schema
from meshprobe.analysis.pipeline import tokens as T
from meshprobe.analysis.probes.loops import LOOP_FEATURES
from meshprobe.cli import main

N_CTX, VOCAB, SEQ = 32, 300, 32


def small_model(variant="mesh", layout="1+2R2+1", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=4, vocab_size=VOCAB, n_ctx=N_CTX, layout=layout, variant=variant, **kw)
    return build_model(cfg).eval()


def zipf_tokens(n, seq=SEQ, seed=0, a=1.1):
    """Token ids with a Zipf-like frequency profile (so the probes' frequent classes have rows)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, VOCAB + 1) ** a
    return torch.from_numpy(rng.choice(VOCAB, size=(n, seq), p=p / p.sum()).astype(np.int64))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three checkpoints (mesh, base, vanilla) sharing a small BPE tokenizer, a text corpus, a token file."""
    from meshprobe.data import train_tokenizer

    root = tmp_path_factory.mktemp("analyze")
    text = (Path(__file__).resolve().parents[1] / "meshprobe" / "model.py").read_text() * 2
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    tok = train_tokenizer([text], vocab_size=VOCAB)
    ckpts = {}
    for name, variant, layout in (("mesh", "mesh", "1+2R2+1"), ("base", "base", "1+2R2+1"), ("van", "vanilla", "4")):
        ckpts[name] = save_checkpoint(small_model(variant, layout), root / name, tokenizer=tok,
                                      train={"data": str(corpus), "seq_len": SEQ})
    tokens = zipf_tokens(12, seed=0).numpy().astype(np.int32)
    np.save(root / "tokens.npy", tokens)
    return {"root": root, "ckpt": ckpts, "tokens": root / "tokens.npy", "corpus": corpus}


def _strict_json(path: Path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=bad)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


# ---------------------------------------------------------------------------------------------------------
# the CLI end to end
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(zoo):
    out = zoo["root"] / "figs"
    rc = main(["analyze", str(zoo["ckpt"]["mesh"]), str(zoo["ckpt"]["base"]), str(zoo["ckpt"]["van"]),
               "--out", str(out), "--tokens", str(zoo["tokens"]), "--no-progress"])
    assert rc == 0
    return out, _strict_json(out / "metrics.json")


@pytest.mark.slow
def test_cli_writes_figures(cli_run):
    out, _ = cli_run
    for stem in ("fig3", "fig4", "fig5", "lens"):
        for fmt in ("png", "pdf"):
            assert (out / f"{stem}.{fmt}").stat().st_size > 1000
    for name in ("mesh", "base", "van"):
        for stem in ("fig1", "cka_linear", "lens", "probes"):
            assert (out / name / f"{stem}.png").is_file() and (out / name / f"{stem}.pdf").is_file()
    assert (out / "mesh" / "router.png").is_file() and (out / "mesh" / "router.pdf").is_file()
    assert not (out / "base" / "router.png").exists()
    report = (out / "report.md").read_text()
    assert "## mesh" in report and "## van" in report and "Routers" in report
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".figs.tmp")]  # temp folder cleaned up


@pytest.mark.slow
def test_metrics_keys_are_documented(cli_run):
    _, doc = cli_run
    paths = R.metric_key_paths(doc)
    assert paths - set(R.METRICS_KEYS) == set(), "keys in metrics.json missing from METRICS_KEYS"
    optional = {k for k in R.METRICS_KEYS if k.startswith(schema.OPTIONAL_SECTIONS)}  # --dynamics, --tuned-lens
    assert set(R.METRICS_KEYS) - optional - paths == set(), "METRICS_KEYS documents keys that were not written"
    assert all(isinstance(v, str) and v for v in R.METRICS_KEYS.values())


@pytest.mark.slow
def test_metrics_values_in_range(cli_run):
    _, doc = cli_run
    assert doc["format"] == schema.FORMAT and [m["name"] for m in doc["models"]] == ["mesh", "base", "van"]
    for m in doc["models"]:
        S = len(m["states"])
        assert m["data"]["n_samples"] == 12 and m["data"]["seq_len"] == SEQ
        assert len(m["update"]["mean"]) == len(m["blocks"])
        assert all(_finite(r) and 0 <= r <= 2 for r in m["update"]["mean"])
        for kind in ("rbf", "linear"):
            cka = np.array(m["cka"][kind]["mean"], dtype=float)
            assert cka.shape == (S, S) and np.isfinite(cka).all()
            # float64 from the (upcast) states: rounding of the n x n Gram products only
            tol = f64_tol(1.0, SEQ * SEQ)
            np.testing.assert_allclose(np.diag(cka), 1.0, **tol)
            np.testing.assert_allclose(cka, cka.T, **tol)
            assert (cka >= -tol["atol"]).all() and (cka <= 1 + tol["atol"]).all()
        spec = np.array(m["spectrum"]["mean"], dtype=float)
        assert spec.shape == (S, 50)
        k = min(SEQ, 32)  # min(seq, d): past it the spectrum is null
        np.testing.assert_allclose(spec[:, 0], 1.0, **f64_tol(1.0, 12))  # s / s[0], averaged over the samples
        assert np.isfinite(spec[:, :k]).all() and np.isnan(spec[:, k:]).all()
        assert (spec[:, :k] > 0).all() and (spec[:, :k] <= 1 + f64_tol(1.0, 12)["atol"]).all()
        assert all(1 <= e <= k for e in m["effective_rank"]["mean"])
        lens = m["lens"]
        assert lens["positions"] == SEQ - 1
        assert all(_finite(x) and x > 0 for x in lens["loss"]["mean"])
        pr = m["probes"]
        assert pr["config"]["n_train_seqs"] + pr["config"]["n_test_seqs"] == 12
        assert set(pr["token"]) == set(pr["features"]) and pr["features"][: len(m["states"])] == m["states"]
        for block in [pr["token"], pr["random_init"]["token"]]:
            for feat, offsets in block.items():
                for k, res in offsets.items():
                    assert 0 <= res["accuracy"] <= 1 and res["n_test"] > 0 and res["offset"] == int(k)
                    assert res["ci"][0] <= res["accuracy"] <= res["ci"][1]
                    assert math.isclose(res["chance"], 1 / res["classes"])
                    assert res["r2_ci"][0] <= res["r2"] <= res["r2_ci"][1] and res["r2"] <= 1
        for feat, offsets in pr["increment"].items():
            assert feat != "h_emb" and "0" not in offsets
            for res in offsets.values():
                assert res["delta_ce_ci"][0] <= res["delta_ce"] <= res["delta_ce_ci"][1]
        assert pr["random_init"]["features"] == [m["states"][-2]]
        # a random model's embedding still identifies the current token far above chance
        cur = pr["token"]["h_emb"]["0"]
        assert cur["accuracy"] > cur["chance"] + 0.2 and cur["retrieval_top1"] > 0.9


@pytest.mark.slow
def test_mesh_router_and_slots(cli_run):
    _, doc = cli_run
    mesh, base, van = doc["models"]
    B = mesh["model"]["mesh_slots"]
    r = mesh["router"]
    assert r["steps"] == ["entry", "loop 1", "loop 2"] and r["slots"] == [f"m{b}" for b in range(B)]
    for key in ("write", "read"):
        w = np.array(r[key]["mean"])
        assert w.shape == (3, B)
        # softmax weights (float32, B terms) averaged over tokens
        np.testing.assert_allclose(w.sum(1), 1.0, **f32_tol(1.0, B))
    for key in ("write_entropy", "read_entropy"):
        assert all(0 <= h <= r["max_entropy"] + f32_tol(r["max_entropy"], B)["atol"] for h in r[key]["mean"])
    assert math.isclose(r["max_entropy"], math.log(B))
    assert np.array(r["slot_norm"]["mean"]).shape == (3, B)
    assert [f for f in mesh["probes"]["features"] if f.startswith("m")] == [f"m{b}" for b in range(B)]
    assert set(mesh["probes"]["token"]) == set(mesh["probes"]["features"])
    # non-mesh models: router skipped with a note, no slot probes
    for m in (base, van):
        assert m["router"] is None
        assert any("router analysis" in n and "skipped" in n for n in m["notes"])
        assert not any(f.startswith("m") and f[1:].isdigit() for f in m["probes"]["features"])
    # loop-step probe: recursive only, six feature sets, chance 1/K on balanced rows, a permutation null
    for kind in LOOP_FEATURES:
        li = mesh["probes"]["loop_step"][kind]
        assert li["ci"][0] <= li["accuracy"] <= li["ci"][1] and math.isclose(li["chance"], 0.5)
        assert li["n_perm"] > 0 and 0 < li["p_value"] <= 1
    assert mesh["probes"]["loop_step"]["state_norm"]["n_features"] == 1
    assert van["probes"]["loop_step"] is None
    assert van["states"][0] == "h_emb" and van["states"][-1] == "h_out" and van["blocks"][0] == "layer 1"


@pytest.mark.slow
def test_coda_lens_reproduces_model_loss(cli_run, zoo):
    """Decoding h^(K) through the coda is the model itself: its lens loss equals the model's own loss."""
    _, doc = cli_run
    tokens = torch.from_numpy(np.load(zoo["tokens"]).astype(np.int64))
    for m in doc["models"]:
        model = load_checkpoint(zoo["ckpt"][m["name"]])
        with torch.no_grad():
            loss = float(model(tokens, return_type="loss"))
        # other batches than one forward of every row: the forward's rounding and the mean over the rows
        want = approx_f32(loss, tokens.numel() + model.cfg.d_mlp, layers=model.cfg.n_layers + 1)
        assert m["lens"]["model_loss"]["mean"] == want
        if m["model"]["kind"] == "recursive":
            assert m["lens"]["coda_states"][-1] == "h^(2)"
            assert m["lens"]["coda_loss"]["mean"][-1] == want
        else:
            assert m["lens"]["coda_loss"]["mean"] is None
        # h_out decoded directly is also the model
        assert m["lens"]["loss"]["mean"][-1] == want


def test_cli_samples_from_checkpoint_corpus(zoo, capsys):
    """Without --tokens: windows of the validation split of the corpus named in the checkpoint metadata."""
    out = zoo["root"] / "sampled"
    rc = main(["analyze", str(zoo["ckpt"]["base"]), "--out", str(out), "--samples", "6", "--seq-len", "16",
               "--no-probes", "--no-progress", "--names", "b0"])
    assert rc == 0
    doc = _strict_json(out / "metrics.json")
    m = doc["models"][0]
    assert m["name"] == "b0" and m["data"]["n_samples"] == 6 and m["data"]["seq_len"] == 16
    assert "corpus.txt" in m["data"]["source"] and m["probes"] is None
    assert (out / "fig1.png").is_file() and not (out / "probes.png").exists()
    a = T.sample_tokens(zoo["ckpt"]["base"], 6, 16, seed=3)
    b = T.sample_tokens(zoo["ckpt"]["base"], 6, 16, seed=3, data=str(zoo["corpus"]))
    assert a.shape == (6, 16) and a.dtype == torch.long and torch.equal(a, b)
    assert not torch.equal(a, T.sample_tokens(zoo["ckpt"]["base"], 6, 16, seed=4))


# ---------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2
# ---------------------------------------------------------------------------------------------------------
def _bad(capsys, argv):
    rc = main(["analyze", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("meshprobe analyze: error:"), err
    return err[0]


def test_bad_inputs(zoo, tmp_path, capsys):
    ck = str(zoo["ckpt"]["mesh"])
    out = str(tmp_path / "o")
    assert "not found" in _bad(capsys, [str(tmp_path / "nope"), "--out", out])
    (tmp_path / "plain").mkdir()
    assert "not a meshprobe checkpoint" in _bad(capsys, [str(tmp_path / "plain"), "--out", out])
    assert "at least 2" in _bad(capsys, [ck, "--out", out, "--samples", "1"])
    assert "n_ctx" in _bad(capsys, [ck, "--out", out, "--seq-len", str(N_CTX + 1)])
    np.save(tmp_path / "long.npy", np.zeros((4, N_CTX + 8), dtype=np.int64))
    assert "n_ctx" in _bad(capsys, [ck, "--out", out, "--tokens", str(tmp_path / "long.npy")])
    (tmp_path / "f.npy").write_bytes(b"not numpy")
    assert "--tokens" in _bad(capsys, [ck, "--out", out, "--tokens", str(tmp_path / "f.npy")])
    np.save(tmp_path / "float.npy", np.zeros((4, 8)))
    assert "integer" in _bad(capsys, [ck, "--out", out, "--tokens", str(tmp_path / "float.npy")])
    np.save(tmp_path / "big.npy", np.full((4, 8), VOCAB + 5))
    assert "token ids" in _bad(capsys, [ck, "--out", out, "--tokens", str(tmp_path / "big.npy")])
    assert "--names" in _bad(capsys, [ck, "--out", out, "--names", "a,b"])
    assert "--offsets" in _bad(capsys, [ck, "--out", out, "--offsets", "a,b"])
    assert "--max-classes" in _bad(capsys, [ck, "--out", out, "--max-classes", "1"])
    assert "--tokens or --data" in _bad(capsys, [ck, "--out", out, "--tokens", str(zoo["tokens"]), "--data", "x"])
    assert not Path(out).exists()


def test_failed_run_keeps_previous_results(zoo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "plot_model", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        main(["analyze", str(zoo["ckpt"]["base"]), "--out", str(out), "--tokens", str(zoo["tokens"]),
              "--no-progress", "--no-probes"])
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_help_does_not_import_torch():
    code = "import sys, meshprobe.cli.analyze; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# library-level pipeline
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_memory_does_not_grow_with_samples():
    """The accumulators (running stats, probe rows and statistics) have the same size after 64 and after 128
    samples once the probes' row caps bind (small caps here; the defaults bind at a few hundred samples).

    Token ids come from a 20-id alphabet so that both runs see every id and fill every class's cap."""
    model = small_model("mesh")
    sizes = []
    caps = dict(max_train_per_class=8, max_test_per_class=4, retrieval_test_rows=64)
    for n in (64, 128):
        tokens = torch.arange(n * SEQ).view(n, SEQ) * 7 % 20
        res = R.analyze_model(model, tokens, batch_size=16, progress=False, baseline=False, offsets=(0, -1),
                              probe_options=caps)
        sizes.append(res["data"]["accumulator_bytes"])
        assert res["data"]["n_samples"] == n
    # the planned rows are a union over offsets, so their count jitters by a few rows; it does not grow with N
    assert sizes[0] > 0 and abs(sizes[1] - sizes[0]) <= 0.01 * sizes[0]


@pytest.mark.slow
def test_analyze_model_is_deterministic_and_batch_size_free():
    model = small_model("residual")
    tokens = zipf_tokens(10, seed=1)
    a = R.analyze_model(model, tokens, batch_size=3, progress=False, offsets=(0, 1))
    b = R.analyze_model(model, tokens, batch_size=10, progress=False, offsets=(0, 1))
    # another batch size: the states round differently through the network, the metrics follow
    for key in ("update", "effective_rank"):
        np.testing.assert_allclose(a[key]["mean"], b[key]["mean"], **model_tol(b[key]["mean"], model.cfg))
    np.testing.assert_allclose(a["cka"]["rbf"]["mean"], b["cka"]["rbf"]["mean"], **model_tol(1.0, model.cfg))
    # same seed and batch size: the same numbers; another batch size changes the forward's rounding only
    assert R.analyze_model(model, tokens, batch_size=3, progress=False, offsets=(0, 1))["probes"] == a["probes"]
    for feat, offsets in a["probes"]["token"].items():
        for k, res in offsets.items():
            other = b["probes"]["token"][feat][k]
            assert res["accuracy"] == pytest.approx(other["accuracy"], abs=1 / res["n_test"] + 1e-9)
            assert res["r2"] == pytest.approx(other["r2"], abs=1e-3)


@pytest.mark.slow
def test_baseline_by_model_size_and_phase_timing(monkeypatch):
    """baseline=None runs the random-init baseline up to BASELINE_AUTO_MAX_PARAMS parameters and says so when it
    skips it; baseline=True runs it whatever the size; every phase that ran is timed."""
    from meshprobe.analysis.probes import suite

    model = small_model("base")
    tokens = zipf_tokens(10, seed=1)
    kw = dict(progress=False, offsets=(0, 1), probe_options=dict(n_perm=2))
    run = R.analyze_model(model, tokens, **kw)
    assert run["probes"]["random_init"]["token"]
    assert set(run["timing"]) == {"forward", "lens", "diagnostics", "cka", "probe_features", "token_probes",
                                  "increment", "loop_step_probe", "random_init_baseline"}
    assert all(v >= 0 for v in run["timing"].values()) and run["timing"]["forward"] > 0
    monkeypatch.setattr(suite, "BASELINE_AUTO_MAX_PARAMS", 10)
    skip = R.analyze_model(model, tokens, **kw)
    assert skip["probes"]["random_init"] is None and "random_init_baseline" not in skip["timing"]
    assert any(n.startswith("random-init baseline of the probes skipped by default") for n in skip["notes"])
    assert skip["probes"]["token"] == run["probes"]["token"]
    assert R.analyze_model(model, tokens, baseline=True, **kw)["probes"]["random_init"] == run["probes"]["random_init"]


def test_per_sample_numbers_match_the_metric_functions():
    """Running stats over the batch agree with the metrics applied sample by sample."""
    model = small_model("anchor")
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(2))
    res = R.analyze_model(model, tokens, progress=False, probes=False)
    spec = collect.state_spec(model)
    _, cache = model.run_with_cache(tokens, names_filter=spec.hook_names())
    states = [cache[h] for _, h in spec.states]
    r = torch.stack([M.relative_update(cache[o], cache[i]) for _, i, o in spec.blocks], 1)
    # the analysis runs its own forward (its states may round differently), the metrics in float64
    cfg = model.cfg
    np.testing.assert_allclose(res["update"]["mean"], r.mean(0).numpy(), **model_tol(r, cfg))
    np.testing.assert_allclose(res["update"]["std"], r.std(0).numpy(), **model_tol(r, cfg))
    cka = torch.stack([M.cka_matrix([s[i] for s in states], "rbf") for i in range(4)]).mean(0)
    np.testing.assert_allclose(res["cka"]["rbf"]["mean"], cka.numpy(), **model_tol(1.0, cfg))
    er = torch.stack([torch.stack([M.effective_rank(s[i]) for s in states]) for i in range(4)]).mean(0)
    np.testing.assert_allclose(res["effective_rank"]["mean"], er.numpy(), **model_tol(er, cfg))
    sp = torch.stack([torch.stack([M.singular_spectrum(s[i]) for s in states]) for i in range(4)]).nanmean(0)
    np.testing.assert_allclose(np.array(res["spectrum"]["mean"], dtype=float), sp.numpy(), **model_tol(1.0, cfg))


def test_lens_subset_matches_model_loss():
    model = small_model("mesh", layout="1+1R3+2")
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(3))
    res = R.analyze_model(model, tokens, progress=False, probes=False, lens_positions=8)
    assert res["lens"]["positions"] == 8
    want = res["lens"]["model_loss"]["mean"]  # the coda run again on h^(K): the rounding of its layers, then the mean
    assert res["lens"]["coda_loss"]["mean"][-1] == approx_f32(want, tokens.numel() + model.cfg.d_mlp,
                                                              layers=model.cfg.n_layers + 1)
    assert len(res["lens"]["coda_states"]) == 4  # h^(0) .. h^(3)


def test_unshared_block_layout_and_small_spec():
    model = small_model("mesh", layout="1+2+2+1")
    spec = collect.state_spec(model)
    assert spec.state_names == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h_out"]
    assert spec.block_names == ["prelude", "loop 1", "loop 2", "coda"]
    assert spec.final_memory_hook == "loop.1.mesh.hook_memory"
    assert set(spec.hook_names()) <= set(model.hook_dict)
    tokens = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(4))
    res = R.analyze_model(model, tokens, progress=False)
    assert res["router"] is not None
    # 3 sequences of 8 random tokens cannot support a token probe: every offset is dropped, with a note each
    assert res["probes"]["token"] == {} and sum("dropped" in n for n in res["notes"]) == 6
    from meshprobe.analysis.report import render_report

    assert "Token probes**: none" in render_report([res])


def test_analyze_model_rejects_bad_tokens():
    from meshprobe.errors import UserError

    model = small_model("base")
    with pytest.raises(UserError, match="at least 2 samples"):
        R.analyze_model(model, torch.zeros(1, 8, dtype=torch.long), progress=False)
    with pytest.raises(UserError, match="n_ctx"):
        R.analyze_model(model, torch.zeros(2, N_CTX + 1, dtype=torch.long), progress=False)
    with pytest.raises(UserError, match="integers"):
        R.analyze_model(model, torch.zeros(2, 8), progress=False)
