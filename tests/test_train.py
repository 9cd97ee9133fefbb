"""`meshprobe train` / `meshprobe eval`: checkpoints, exact resume, DDP, NaN, bad input, config parsing.

Everything trains a d32 model with a 512-token BPE on a ~160 kB slice of Shakespeare written to a temp file,
so the whole file runs in well under a minute or two on 2 CPU cores (the DDP test is the slowest part).
"""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import approx_f32, f32_tol, shakespeare_text
from meshprobe import load_checkpoint
from meshprobe.cli import main

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small corpus file and a private token cache for this module."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_text(2, 80_000), encoding="utf-8")
    preset = root / "small.toml"
    preset.write_text(
        '[model]\nd_model = 32\nn_heads = 4\nvocab_size = 512\nn_ctx = 64\nlayout = "1+1R2+1"\nvariant = "base"\n'
        f'[train]\ndata = "{corpus}"\nseq_len = 32\nbatch_size = 8\nsteps = 6\nlr = 3e-3\nlog_every = 1\n'
        'eval_every = 3\neval_batches = 2\n'
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("MESHPROBE_CACHE", str(root / "cache"))
    yield {"root": root, "corpus": corpus, "preset": preset, "cache": root / "cache"}
    mp.undo()


def train_args(env, out, *extra):
    return ["train", "--config", str(env["preset"]), "--out", str(out), "--quiet", *extra]


def read_log(path):
    return [json.loads(line) for line in (Path(path) / "train_log.jsonl").read_text().splitlines() if line.strip()]


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(env):
    out = env["root"] / "trained"
    assert main(train_args(env, out)) == 0
    return out


# --------------------------------------------------------------------------------------------- train + eval
def test_train_writes_loadable_checkpoint_tokenizer_and_log(trained):
    from meshprobe import load_checkpoint, load_tokenizer

    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "rng.safetensors",
            "training_state.json", "train_log.jsonl"} <= names
    model = load_checkpoint(trained)
    tok = load_tokenizer(trained)
    assert tok is not None and tok.get_vocab_size() <= model.cfg.vocab_size == 512
    meta = model.checkpoint_config["metadata"]
    assert meta["step"] == 6 and meta["complete"] and meta["tokens_seen"] == 6 * 8 * 32
    assert meta["train"]["lr"] == 3e-3 and meta["meshprobe_version"] and meta["device"].startswith("cpu")
    assert math.isfinite(meta["val_loss"]) and meta["val_ppl"] == pytest.approx(math.exp(meta["val_loss"]))
    log = read_log(trained)
    train_recs = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if r["type"] == "eval"] == [3, 6]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    ids = tok.encode("To be, or not to be").ids
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, len(ids), 512)


def test_eval_cli_json(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    meta = json.loads((trained / "config.json").read_text())["metadata"]
    cfg = load_checkpoint(trained).cfg  # the same rows, maybe in other batches: the forward's rounding, the mean
    assert result["loss"] == approx_f32(meta["val_loss"], result["tokens"] + cfg.d_mlp, layers=cfg.n_layers + 1)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["tokens"] == 2 * 8 * 32 and result["seq_len"] == 32
    assert main(["eval", str(trained), "--batches", "1", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "ppl" in out


def test_tokenizer_reuse_and_eval_on_other_data(env, trained, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(env["corpus"].read_text()[40_000:100_000])
    out = tmp_path / "family"
    argv = train_args(env, out, "--steps", "2", "--eval-batches", "0", "--data", str(other), "--tokenizer", str(trained))
    assert main(argv) == 0
    assert (out / "tokenizer.json").read_text() == (trained / "tokenizer.json").read_text()
    capsys.readouterr()
    assert main(["eval", str(trained), "--data", str(other), "--batches", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == str(other) and result["tokens"] == 8 * 32 and math.isfinite(result["loss"])


def test_eval_cli_bad_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- exact resume
def test_ctrl_c_saves_and_resume_is_exact(env, trained, monkeypatch, capsys):
    import meshprobe.training.loop as train_mod

    out = env["root"] / "interrupted"

    def hook(step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_mod, "_step_hook", hook)
    assert main(train_args(env, out)) == 130
    assert "interrupted at step 3/6" in capsys.readouterr().err
    state = json.loads((out / "training_state.json").read_text())
    assert state["step"] == 3
    monkeypatch.setattr(train_mod, "_step_hook", None)
    # a record past the checkpoint (as after a crash) must be dropped on resume
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"type": "train", "step": 5, "loss": 0.0}) + "\n")
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # config from the checkpoint
    assert strip_timing(read_log(out)) == strip_timing(read_log(trained))
    w_resumed, w_full = weights(out), weights(trained)
    assert all(torch.equal(w_resumed[k], w_full[k]) for k in w_full)
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["step"] == 6 and meta["complete"] and meta["status"] == "completed"


def test_stop_after_then_resume_is_exact_mesh_with_accumulation(env, capsys):
    extra = ["--variant", "mesh", "--micro-batch-size", "4", "--save-every", "2"]
    full, part = env["root"] / "mesh-full", env["root"] / "mesh-part"
    assert main(train_args(env, full, *extra)) == 0
    assert main(train_args(env, part, *extra, "--stop-after", "3")) == 0
    assert json.loads((part / "training_state.json").read_text())["step"] == 3
    # with --config the model config must match the checkpoint's; the schedule still spans 6 steps
    assert main(train_args(env, part, *extra, "--resume")) == 0
    assert strip_timing(read_log(part)) == strip_timing(read_log(full))
    w_part, w_full = weights(part), weights(full)
    assert all(torch.equal(w_part[k], w_full[k]) for k in w_full)
    # resuming a finished run is a no-op; resuming with more steps extends it
    assert main(train_args(env, part, *extra, "--resume")) == 0
    assert main(train_args(env, part, *extra, "--resume", "--steps", "8")) == 0
    assert json.loads((part / "training_state.json").read_text())["step"] == 8


def test_resume_with_other_model_config_is_refused(env, trained, capsys):
    before = (trained / "model.safetensors").read_bytes()
    assert main(train_args(env, trained, "--resume", "--d-model", "64")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model config" in err[0]
    assert (trained / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------------- NaN
def test_nan_loss_stops_and_keeps_last_checkpoint(env, monkeypatch, capsys):
    import meshprobe.training.loop as train_mod

    real = train_mod.compute_loss
    calls = {"n": 0}

    def poisoned(model, x, y):
        calls["n"] += 1
        loss = real(model, x, y)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_mod, "compute_loss", poisoned)
    out = env["root"] / "nan"
    assert main(train_args(env, out, "--save-every", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan at step 5" in err[0] and "step 4" in err[0]
    from meshprobe import load_checkpoint

    model = load_checkpoint(out)
    assert model.checkpoint_config["metadata"]["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "unknown preset": (["--config", "no-such-preset"], "unknown preset"),
    "unknown key": (["--no-such-key", "1"], "unknown option --no_such_key"),
    "bad value": (["--lr", "fast"], "--lr: expected a number"),
    "missing data": (["--data", "/no/such/file.txt"], "data path not found"),
    "empty data": (["--data", "{empty}"], "no text"),
    "seq_len above context": (["--seq-len", "128"], "above the model context"),
    "bad layout": (["--layout", "3R"], "does not parse"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(env, case, capsys, tmp_path):
    args, message = BAD_INPUTS[case]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [a.replace("{empty}", str(empty)) for a in args]
    out = tmp_path / "out"
    argv = train_args(env, out)
    if args[0] == "--config":
        argv[2] = args[1]
        args = []
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshprobe train: error:") and message in err[0], err
    assert not out.exists()


def test_batch_not_dividing_across_processes(env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(train_args(env, tmp_path / "out", "--batch-size", "7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide across 2 processes" in err[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten(env, trained, capsys, tmp_path):
    snapshot = {p.name: p.read_bytes() for p in trained.iterdir()}
    assert main(train_args(env, trained)) == 2  # exists, neither --resume nor --overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == snapshot
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    for flag in ("--overwrite", "--resume"):
        assert main(train_args(env, other, flag)) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (other / "keep.txt").read_text() == "precious" and len(list(other.iterdir())) == 1
    assert main(train_args(env, trained, "--resume", "--overwrite")) == 2
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == snapshot


def test_second_process_on_same_output_is_refused(env, tmp_path, capsys):
    import fcntl

    out = tmp_path / "busy"
    with open(tmp_path / ".busy.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(train_args(env, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another meshprobe train process" in err[0] and not out.exists()


def test_overwrite_replaces_a_checkpoint(env, tmp_path):
    out = tmp_path / "ck"
    assert main(train_args(env, out, "--steps", "2", "--eval-batches", "0")) == 0
    assert main(train_args(env, out, "--steps", "3", "--eval-batches", "0", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["metadata"]["step"] == 3
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no lock or temp files left beside it


def test_console_entry_point_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "meshprobe", "train", "--config", "nope", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown preset" in proc.stderr


# --------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_match_one_process(env, tmp_path):
    """torchrun with 2 gloo processes logs the same losses as 1 process with the same global batch."""
    extra = ["--variant", "mesh", "--steps", "4", "--eval-every", "2"]
    single = tmp_path / "single"
    assert main(train_args(env, single, *extra)) == 0  # also fills the token cache for the workers
    double = tmp_path / "double"
    child_env = dict(os.environ, OMP_NUM_THREADS="1", MESHPROBE_CACHE=str(env["cache"]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        child_env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "meshprobe", *train_args(env, double, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env, timeout=300)
    # the workers' own lines first: torchrun's summary at the end would hide which step a rank died in
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[:6000], proc.stderr[-2000:])
    meta = json.loads((double / "config.json").read_text())["metadata"]
    assert meta["world_size"] == 2 and meta["step"] == 4
    one, two = read_log(single), read_log(double)
    assert [(r["type"], r["step"]) for r in one] == [(r["type"], r["step"]) for r in two]
    # two processes sum the gradients in another order: each step's rounding (a forward and a backward through
    # the layers) is carried into the next through the weights
    cfg = load_checkpoint(single).cfg
    n_terms, depth = cfg.d_mlp, 2 * (cfg.n_layers + 1)
    for a, b in zip(one, two):
        key = "loss" if a["type"] == "train" else "val_loss"
        assert b[key] == approx_f32(a[key], n_terms, layers=depth * a["step"]), (a, b)
        if a["type"] == "train":
            assert b["lr"] == a["lr"]
            assert b["grad_norm"] == approx_f32(a["grad_norm"], n_terms, layers=depth * a["step"])
    w1, w2 = weights(single), weights(double)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], **f32_tol(w1[k], n_terms, layers=depth * 4))


# --------------------------------------------------------------------------------------------- config parsing
def test_parse_overrides_types():
    from meshprobe.training import parse_overrides

    got = parse_overrides(["--variant", "mesh", "--lr=1e-3", "--compile", "--mesh-slots", "none", "--betas",
                           "0.9,0.99", "--data", "a.txt", "b.txt", "--tokens", "1e6", "--scale-embeddings", "false",
                           "--layout", "3+6R3+3"])
    assert got == {"variant": "mesh", "lr": 1e-3, "compile": True, "mesh_slots": None, "betas": (0.9, 0.99),
                   "data": ["a.txt", "b.txt"], "tokens": 1_000_000, "scale_embeddings": False, "layout": "3+6R3+3"}


def test_load_config_steps_tokens_and_presets():
    from meshprobe.training import list_presets, load_config

    model, train = load_config("tiny", ["--tokens", "65536"])
    assert train.steps is None and train.total_steps == math.ceil(65536 / (train.batch_size * train.seq_len))
    presets = list_presets()
    for name in ("tiny", "cpu-zoo", "gpu-small", "loop3", "loop3-vanilla", "loop2", "loop2-vanilla"):
        assert name in presets
    for name in presets:
        model, train = load_config(name)
        assert train.seq_len <= model.n_ctx and train.total_steps > 0
    for family in ("loop3", "loop2"):
        looped, vanilla = load_config(family)[0], load_config(f"{family}-vanilla")[0]
        assert looped.unrolled_depth == vanilla.unrolled_depth and vanilla.variant == "vanilla"
        assert load_config(family, ["--variant", "mesh"])[0].variant == "mesh"
    assert load_config("loop3")[0].n_loops == 3 and load_config("loop2")[0].n_loops == 2


def test_lr_schedule():
    from meshprobe.training import lr_at

    total, peak = 1000, 1e-3
    lrs = [lr_at(s, total, peak, 0.01, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak) and lrs[10] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak) and min(lrs[10:]) == pytest.approx(0.1 * peak)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_groups():
    from conftest import tiny_cfg

    from meshprobe import build_model
    from meshprobe.training import param_groups

    model = build_model(tiny_cfg(variant="mesh"))
    names, groups = param_groups(model, 0.01)
    n_decay = len(groups[0]["params"])
    decayed, plain = set(names[:n_decay]), set(names[n_decay:])
    assert "embed.weight" in decayed and "unembed.weight" in decayed and "entry.mesh.write_router.weight" in decayed
    assert "ln_final.weight" in plain and "core.layers.0.attn.qkv.bias" in plain
    assert groups[1]["weight_decay"] == 0.0 and len(names) == len(list(model.parameters()))
