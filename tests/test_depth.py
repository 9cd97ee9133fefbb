"""Test-time depth: load_checkpoint(path, loops=K), `eval` / `analyze --loops`, meshprobe.analysis.depth.

Tiny d32 models saved untrained (the checks are exact identities, not accuracies) and a short task run."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import approx_f32, model_tol, tiny_cfg

from meshprobe import build_model, load_checkpoint, save_checkpoint
from meshprobe.cli import main
from meshprobe.data import tasks
from meshprobe.errors import UserError
from meshprobe.evaluate import evaluate_task

ROOT = Path(__file__).resolve().parents[1]

TASK = "task:phop:hops=2,symbols=8,seq_len=12,mix=1"


def saved(tmp_path, name, **cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**cfg))
    return save_checkpoint(model, tmp_path / name), model


@pytest.mark.parametrize("variant", ["base", "anchor", "mesh"])
def test_fewer_loops_equal_the_trained_model_read_at_that_step(tmp_path, variant):
    """The model run with K' < K loop steps gives exactly the trained model's h^(K') through the coda, and
    K' = K is the trained model itself."""
    path, model = saved(tmp_path, variant, variant=variant)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
        assert torch.equal(load_checkpoint(path, loops=3)(x), model(x))
        short = load_checkpoint(path, loops=2)
        assert short.cfg.layout == "1+2R2+1" and short.cfg.n_loops == 2
        want = model.readout(cache["loop.1.hook_state_out"], through_coda=True)
        torch.testing.assert_close(short(x), want, **model_tol(want, model.cfg))
    assert short.checkpoint_config["model"]["layout"] == "1+2R3+1"  # the file's config is kept


def test_more_loops_repeat_the_core(tmp_path):
    path, model = saved(tmp_path, "base")
    deep = load_checkpoint(path, loops=5)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        _, cache = deep.run_with_cache(x)
        h = cache["loop.2.hook_state_out"]
        core_again = model.core(h, model.rotary_cos, model.rotary_sin, list(deep.blocks[7:9]))
    assert len(deep.loop) == 5 and "loop.4.hook_state_out" in cache
    # base: h^(4) = f_core(h^(3))
    torch.testing.assert_close(cache["loop.3.hook_state_out"], core_again, **model_tol(core_again, deep.cfg))


@pytest.mark.parametrize("cfg, loops, message", [
    (dict(variant="mesh"), 4, "trained 3 loop steps"), (dict(variant="static_comb"), 5, "loops <= 3"),
    (dict(variant="vanilla", layout="5"), 2, "no looped core"), (dict(variant="mesh", layout="1+2+2+1"), 1,
                                                                  "no looped core"),
    (dict(variant="base"), 0, "must be an integer >= 1")])
def test_loops_that_cannot_run_are_one_line_errors(tmp_path, cfg, loops, message):
    path, _ = saved(tmp_path, "m", **cfg)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path, loops=loops)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth") / "run"
    assert main(["train", "--config", "cpu-zoo", "--out", str(out), "--quiet", "--d-model", "32", "--n-heads", "2",
                 "--vocab-size", "10", "--n-ctx", "13", "--layout", "1+1R2+1", "--variant", "mesh", "--data", TASK,
                 "--batch-size", "8", "--steps", "4", "--eval-every", "2", "--eval-batches", "1"]) == 0
    return out


def test_eval_loops_sweep_one_result_per_k(task_run, capsys):
    assert main(["eval", str(task_run), "--loops", "1,2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in results] == [1, 2]
    assert main(["eval", str(task_run), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["loops"] == 2 and plain["task_acc"] == pytest.approx(results[1]["task_acc"])
    assert main(["eval", str(task_run), "--loops", "2"]) == 0
    assert "at K=2" in capsys.readouterr().out


@pytest.mark.parametrize("loops, message", [("0", "--loops must be"), ("1,x", "--loops must be"),
                                            ("1,3", "--loops 3: this mesh model has per-step parameters for its trained 2")])
def test_eval_and_analyze_refuse_bad_loops_before_any_work(task_run, tmp_path, capsys, loops, message):
    assert main(["eval", str(task_run), "--loops", loops]) == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "an"
    assert main(["analyze", str(task_run), "--out", str(out), "--loops", loops, "--samples", "16"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_analyze_task_checkpoint_at_each_k(task_run, tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", str(task_run), "--out", str(out), "--loops", "1,2", "--samples", "16"]) == 0
    models = json.loads((out / "ground_truth.json").read_text())["models"]
    assert list(models) == ["run@K1", "run@K2"]
    assert models["run@K1"]["latent_map"]["states"][:4] == ["h_emb", "h^(0)", "h^(1)", "h_out"]


def test_task_depth_per_hop_count(task_run):
    from meshprobe.analysis.depth import task_depth

    r = task_depth(task_run, loops=[1, 2, 3], n_sequences=32)
    assert r["trained_loops"] == 2 and r["asked"] == {"1": 1, "2": 2, "3": 2}
    assert r["acc"]["3"][2] is None and all(0 <= a <= 1 for a in r["acc"]["2"][:2])
    assert r["hop_p_answer"]["2"] == 1.0 and 0 < r["hop_p_answer"]["3"] < 1
    fresh = evaluate_task(load_checkpoint(task_run), tasks.parse_task(TASK), 32, torch.device("cpu"), seed=1)
    assert r["acc"]["2"][1] == pytest.approx(fresh["task_acc"])


def test_text_depth_loss_and_lens(tmp_path):
    from meshprobe.analysis.depth import text_depth
    from meshprobe.evaluate import sample_loss

    path, model = saved(tmp_path, "base")
    tokens = np.random.default_rng(0).integers(0, 97, (6, 16))
    r = text_depth(path, tokens, loops=[1, 3, 4], batch_size=4)
    # other batch shapes than sample_loss's: the loss moves by the rounding of the forward and the row mean
    n_terms, layers = tokens.size + model.cfg.d_mlp, model.cfg.n_layers + 1
    assert r["loss"][1] == approx_f32(sample_loss(model, tokens), n_terms, layers=layers)
    assert len(r["lens"][2]) == 5  # h^(0..4)
    assert r["trained_loops"] == 3 and r["lens"][0][:2] == approx_f32(r["lens"][1][:2], n_terms, layers=layers)


def test_analyze_text_checkpoint_at_each_k(tmp_path):
    path, _ = saved(tmp_path, "base")
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 97, (8, 16)))
    out = tmp_path / "an"
    assert main(["analyze", str(path), "--out", str(out), "--loops", "2,4", "--tokens", str(tokens), "--no-probes",
                 "--no-progress", "--lens-positions", "0"]) == 0
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert [m["name"] for m in models] == ["base@K2", "base@K4"]
    assert [len(m["lens"]["states"]) for m in models] == [5, 7]  # h_emb, h^(0..K), h_out


def test_eval_of_a_bundled_checkpoint_needs_no_corpus(capsys):
    """Bundled checkpoints ship val_tokens.npy: eval reads it when no --data is given (the corpus they were
    trained on is not on this machine), and its loss is the mean over those rows."""
    from meshprobe.evaluate import sample_loss

    ckpt = ROOT / "checkpoints" / "loop3-base"
    assert main(["eval", str(ckpt), "--batches", "1", "--batch-size", "3", "--seq-len", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "val_tokens.npy" in res["data"] and res["tokens"] == 3 * 32
    rows = np.load(ckpt / "val_tokens.npy")[:3, :32]
    model = load_checkpoint(ckpt)
    want = sample_loss(model, rows)  # other batches than eval's: the rounding of the forward and the row mean
    assert res["loss"] == approx_f32(want, rows.size + model.cfg.d_mlp, layers=model.cfg.n_layers + 1)
