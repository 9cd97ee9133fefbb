"""Training on a synthetic task (`meshprobe train --data task:...`): config entry, masking, task accuracy in
the eval records, exact resume, stop_acc, errors, `meshprobe data show` / `meshprobe eval` / a task zoo.

A d32 model on 2-hop induction with 10 symbols over 12 positions: every test trains a handful of steps."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import approx_f32, f32_tol

from meshprobe import load_checkpoint
from meshprobe.data import tasks
from meshprobe.cli import main

SPEC = "task:phop:hops=2,symbols=8,seq_len=12,mix=1"
MODEL = ["--d-model", "32", "--n-heads", "2", "--vocab-size", "10", "--n-ctx", "13"]
TRAIN = ["--data", SPEC, "--batch-size", "8", "--steps", "6", "--log-every", "1", "--eval-every", "3",
         "--eval-batches", "2", "--lr", "3e-3"]


def train_args(out, *extra):
    return ["train", "--config", "cpu-zoo", "--out", str(out), "--quiet", *MODEL, *TRAIN, *extra]


def read_log(path):
    return [json.loads(line) for line in (Path(path) / "train_log.jsonl").read_text().splitlines() if line.strip()]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("task") / "run"
    assert main(train_args(out)) == 0
    return out


def test_task_checkpoint_records_the_task_and_its_accuracy(trained):
    config = json.loads((trained / "config.json").read_text())
    meta = config["metadata"]
    assert meta["task"] == {"name": "phop", "hops": 2, "symbols": 8, "seq_len": 12, "prefix": [9],
                            "train_hops": [1, 2]}
    assert meta["train"]["seq_len"] == 13  # the task fixes the sequence length (prefix + n)
    assert not (trained / "tokenizer.json").exists()
    evals = [r for r in read_log(trained) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert 0.0 <= r["task_acc"] <= 1.0 and set(r["task_acc_by_hops"]) == {"1", "2"}
        assert r["task_acc"] == r["task_acc_by_hops"]["2"] and np.isfinite(r["val_loss"])
    assert meta["task_acc"] == evals[-1]["task_acc"]


def test_external_check_protocol_matches_the_logged_accuracy(trained):
    """What an outside check does: load, prepend the prefix, argmax over the first v logits."""
    from meshprobe import load_checkpoint

    model = load_checkpoint(trained)
    entry = model.checkpoint_config["metadata"]["task"]
    spec = tasks.task_from_entry(entry)
    batch = tasks.eval_set(spec, 16)  # eval_batches * batch_size sequences, as in training
    x = batch.tokens[:, batch.offset:]
    tokens = np.concatenate([np.tile(entry["prefix"], (len(x), 1)), x], axis=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens))
    acc = tasks.task_accuracy(logits, batch.targets, entry["symbols"])
    assert acc == pytest.approx([r for r in read_log(trained) if r["type"] == "eval"][-1]["task_acc"])


def test_loss_is_the_mean_over_defined_targets_only():
    from meshprobe.evaluate import compute_loss, token_loss

    spec = tasks.parse_task(SPEC)
    batch = tasks.train_batch(spec, 8, step=0, seed=0)
    x, y = torch.from_numpy(batch.tokens), torch.from_numpy(batch.targets)
    logits = torch.randn(*x.shape, 10, requires_grad=True)
    loss = compute_loss(lambda _: logits, x, y)
    mask = y >= 0
    manual = torch.nn.functional.cross_entropy(logits[mask], y[mask])
    assert 0 < mask.float().mean() < 1
    torch.testing.assert_close(loss, manual, **f32_tol(manual, int(mask.sum()) + 10))
    loss.backward()
    assert logits.grad[~mask].abs().max() == 0 and logits.grad[mask].abs().max() > 0
    # no shift: the target at column j is the answer for the symbol at column j
    assert (y[:, 0] == tasks.IGNORE).all()  # the hop-count token has no target
    assert torch.equal(token_loss(logits, y), loss)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, trained):
    out = tmp_path / "resumed"
    assert main(train_args(out, "--stop-after", "3")) == 0
    assert json.loads((out / "config.json").read_text())["metadata"]["status"] == "stopped"
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    a, b = weights(trained), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in recs]
    assert strip(read_log(out)) == strip(read_log(trained))


def test_stop_acc_stops_at_the_first_evaluation_reaching_it(tmp_path):
    out = tmp_path / "solved"
    assert main(train_args(out, "--stop-acc", "0.01")) == 0
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["status"] == "solved" and meta["step"] == 3 and meta["task_acc"] >= 0.01
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # already solved: nothing more
    assert json.loads((out / "config.json").read_text())["metadata"]["step"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--vocab-size", "9"], "vocab_size >= 10"),
    (["--n-ctx", "12"], "seq_len 13 is above the model context n_ctx=12"),
    (["--data", "task:phop:hops=0"], "hops must be an integer >= 1"),
    (["--data", "task:phop:hops=2,colour=3"], "bad parameter"),
    (["--data", "shakespeare", "--stop-acc", "0.9"], "stop_acc needs task data"),
])
def test_bad_task_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(train_args(out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_data_show_and_eval_on_a_task(trained, capsys):
    assert main(["data", "show", "--data", SPEC]) == 0
    out = capsys.readouterr().out
    assert "latent 2" in out and "'prefix': [9]" in out
    assert main(["eval", str(trained), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    last = [r for r in read_log(trained) if r["type"] == "eval"][-1]
    cfg = load_checkpoint(trained).cfg  # the same rows as training's eval; the loss within the forward's rounding
    assert res["task_acc"] == pytest.approx(last["task_acc"])
    assert res["loss"] == approx_f32(last["val_loss"], 16 * cfg.n_ctx + cfg.d_mlp, layers=cfg.n_layers + 1)
    assert main(["eval", str(trained), "--data", "shakespeare"]) == 2


@pytest.mark.slow
def test_task_zoo_trains_collects_and_bundles(tmp_path):
    from meshprobe import load_checkpoint
    from meshprobe.paper import zoo

    spec_file = tmp_path / "z.toml"
    spec_file.write_text(f'preset = "cpu-zoo"\n[overrides]\ndata = "{SPEC}"\nvocab_size = 10\nn_ctx = 13\n'
                         'd_model = 32\nn_heads = 2\nbatch_size = 8\nsteps = 4\neval_every = 2\neval_batches = 1\n'
                         'save_every = 0\n[[run]]\nname = "b"\nvariant = "base"\n[bundle]\nruns = ["b"]\n')
    assert main(["zoo", "--spec", str(spec_file), "--out", str(tmp_path / "runs"), "--bundle",
                 str(tmp_path / "ck")]) == 0
    results = json.loads((tmp_path / "ck" / "results.json").read_text())["runs"]
    row = results[0]
    assert row["run"] == "b-s0" and row["task"]["prefix"] == [9] and [s for s, _ in row["curve"]] == [2, 4]
    assert 0 <= row["fresh_task_acc"] <= 1 and row["fresh_targets"] > 1000
    assert not (tmp_path / "ck" / "val_tokens.npy").exists()
    model = load_checkpoint(tmp_path / "ck" / "b")
    assert model.checkpoint_config["metadata"]["task"]["name"] == "phop"
    assert next(model.parameters()).dtype == torch.float32  # loads as fp32 from fp16 storage
    assert zoo.zoo_task(zoo.load_zoo("zoo-tasks")).entry()["prefix"] == [9]
    # a run folder removed later: collecting again keeps its earlier row, marked as carried over
    import shutil

    shutil.rmtree(tmp_path / "runs" / "b-s0")
    assert main(["zoo", "--spec", str(spec_file), "--out", str(tmp_path / "runs"), "--no-train"]) == 0
    carried = json.loads((tmp_path / "runs" / "results.json").read_text())["runs"]
    assert carried == [{**row, "carried": True}]
    # a merging bundle: seed 1 of another spec's run replaces the bundled "b"; the rest of the bundle stays
    merge_file = tmp_path / "m.toml"
    merge_file.write_text(spec_file.read_text().split("[[run]]")[0] + '[[run]]\nname = "m"\nvariant = "anchor"\n'
                          'seeds = [1]\n[bundle]\nruns = ["m-s1"]\nmerge = true\n[bundle.as]\n"m-s1" = "b"\n')
    before = (tmp_path / "ck" / "results.json").read_bytes()
    assert main(["zoo", "--spec", str(merge_file), "--out", str(tmp_path / "mruns"), "--bundle",
                 str(tmp_path / "ck")]) == 0
    manifest = json.loads((tmp_path / "ck" / "zoo.json").read_text())
    assert [(m["name"], m["variant"], m["run"], m["spec"]) for m in manifest["models"]] == [("b", "anchor", "m-s1", "m.toml")]
    assert (tmp_path / "ck" / "results.json").read_bytes() == before and manifest["spec"] == "z.toml"
    assert manifest["models"][0]["result"]["run"] == "m-s1" and "fresh_task_acc" in manifest["models"][0]["result"]
    assert load_checkpoint(tmp_path / "ck" / "b").cfg.variant == "anchor"
    assert main(["zoo", "--spec", str(merge_file), "--out", str(tmp_path / "mruns"), "--no-train", "--bundle",
                 str(tmp_path / "empty")]) == 2  # nothing to merge into
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_analyze_and_figures_on_task_checkpoints(tmp_path, trained, capsys):
    from meshprobe.paper import zoo

    out = tmp_path / "an"
    assert main(["analyze", str(trained), "--out", str(out), "--samples", "24"]) == 0
    doc = json.loads((out / "ground_truth.json").read_text())
    model = doc["models"]["run"]
    assert doc["task"]["prefix"] == [9] and model["latent_map"]["targets"] == ["hop_1", "hop_2"]
    assert (out / "phop.png").is_file() and len(model["patching"]["effect"]) == 4  # h^(0..3)
    assert main(["analyze", str(trained), "--out", str(tmp_path / "x"), "--data", "task:phop:hops=3"]) == 2
    err = capsys.readouterr().err
    assert "seq_len=12,mix=1, not --data task:phop:hops=3" in err and not (tmp_path / "x").exists()
    # a bundled task zoo -> meshprobe figures --tasks-only
    ck = tmp_path / "ck" / "tasks"
    (ck / "run").mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "train_log.jsonl"):
        (ck / "run" / f).write_bytes((trained / f).read_bytes())
    (ck / zoo.MANIFEST_FILE).write_text(json.dumps({"models": [{"name": "run"}]}))
    assert main(["figures", "--checkpoints", str(tmp_path / "ck"), "--tasks-only", "--out", str(tmp_path / "fig"),
                 "--samples", "24"]) == 0
    assert {p.name for p in (tmp_path / "fig" / "tasks").iterdir()} == {"phop.png", "phop.pdf", "ground_truth.json",
                                                                        "results.md"}


def test_keep_every_keeps_light_snapshots_beside_the_run(tmp_path):
    """keep_every: step 0 and every N steps kept as loadable weights + config (no optimizer state), beside the
    run; a resumed run passing the steps again keeps the same set."""
    from meshprobe import load_checkpoint
    from meshprobe.training.state import snapshot_dir, snapshot_paths

    out = tmp_path / "run"
    assert main(train_args(out, "--keep-every", "2", "--stop-after", "3")) == 0
    assert [s for s, _ in snapshot_paths(out)] == [0, 2]
    assert main(train_args(out, "--keep-every", "2", "--resume")) == 0
    kept = snapshot_paths(out)
    assert [s for s, _ in kept] == [0, 2, 4, 6] and snapshot_dir(out) == tmp_path / "run.snapshots"
    assert sorted(p.name for p in kept[1][1].iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((kept[1][1] / "config.json").read_text())["metadata"]
    assert meta["step"] == 2 and meta["status"] == "snapshot"
    last = weights(kept[-1][1])
    assert all(torch.equal(last[k], v) for k, v in weights(out).items())  # step 6 = the final checkpoint
    assert not torch.equal(weights(kept[0][1])["embed.weight"], last["embed.weight"])
    assert load_checkpoint(kept[0][1]).cfg.d_model == 32
