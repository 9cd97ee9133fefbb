"""Checkpoint tests: save -> load gives identical logits; bad checkpoints fail with one line naming the file."""
import json

import pytest
import torch
from conftest import tiny_cfg

from meshprobe import build_model, load_checkpoint, save_checkpoint
from meshprobe.checkpoint import CheckpointError
from meshprobe.cli import main


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_cfg(variant="mesh")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = save_checkpoint(model, tmp_path / "ck", note="hello")
    return model, path


def tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["base", "mesh", "vanilla", "dynamic_comb"])
def test_save_load_identical_logits(tmp_path, variant):
    cfg = tiny_cfg(variant=variant, layout="5" if variant == "vanilla" else "1+2R3+1")
    model = build_model(cfg).eval()
    path = save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(path)
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.cfg == cfg


def test_checkpoint_layout_and_metadata(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["metadata"] == {"note": "hello"} and config["model"]["variant"] == "mesh"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(set(keys)) == len(model.state_dict())
    assert sum(k.startswith("core.layers.0.") for k in keys) == sum(
        k.startswith("core.layers.0.") for k in model.state_dict())  # tied core stored once


def test_fp16_storage_and_extra_files(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    path = save_checkpoint(model, tmp_path / "ck", dtype=torch.float16, files={"notes.txt": "x", "state.bin": b"\x00"})
    assert (path / "notes.txt").read_text() == "x" and (path / "state.bin").read_bytes() == b"\x00"
    loaded = load_checkpoint(path)
    assert loaded.embed.weight.dtype == torch.float32
    # stored as float16 (round to nearest, the same on every CPU), read back exactly
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight.half().float(), rtol=0, atol=0)


def test_overwrite_is_atomic_and_keeps_old_on_failure(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    import meshprobe.checkpoint as ck

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(RuntimeError):
        ck.save_checkpoint(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ck"]  # no temp dirs left behind


def corrupt_truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def corrupt_header(path):
    (path / "model.safetensors").write_bytes(b"\xff" * 64)


def corrupt_config_json(path):
    (path / "config.json").write_text("{not json")


def corrupt_mismatch(path):
    config = json.loads((path / "config.json").read_text())
    config["model"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(config))


def corrupt_missing_weights(path):
    (path / "model.safetensors").unlink()


def corrupt_missing_config(path):
    (path / "config.json").unlink()


def corrupt_bad_variant(path):
    config = json.loads((path / "config.json").read_text())
    config["model"]["variant"] = "mesh++"
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "corrupt, names",
    [
        (corrupt_truncate, "model.safetensors"),
        (corrupt_header, "model.safetensors"),
        (corrupt_config_json, "config.json"),
        (corrupt_mismatch, "model.safetensors"),
        (corrupt_missing_weights, "model.safetensors"),
        (corrupt_missing_config, "config.json"),
        (corrupt_bad_variant, "config.json"),
    ],
)
def test_corrupted_checkpoints_fail_cleanly(saved, corrupt, names, capsys):
    _, path = saved
    corrupt(path)
    with pytest.raises(CheckpointError, match=names) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    # the CLI turns it into one line on stderr and exit code 2
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err


def test_missing_and_foreign_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="not a meshprobe checkpoint"):
        load_checkpoint(tmp_path / "dir")
    (tmp_path / "dir" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a meshprobe checkpoint config"):
        load_checkpoint(tmp_path / "dir")


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    _, path = saved

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(path)


def test_info_cli(saved, capsys):
    _, path = saved
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "router" in out and "loop.2.mesh.hook_memory" in out and "non_embedding" in out
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["router"] > 0 and "coda.hook_out" in data["hooks"]
