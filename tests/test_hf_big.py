"""Big transformers models with the existing engines: --dtype (the analyses accumulate in float32 / float64 whatever
the weights' dtype) and --device-map auto (accelerate's big-model inference), here with part of a tiny Dory
forced onto disk through max_memory: the loop hooks fire as in memory and give the same states."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from meshprobe import hf
from meshprobe.analysis.pipeline.analyze import analyze_model
from meshprobe.analysis.pipeline.collect import iter_caches, state_spec
from meshprobe.cli import main

warnings.filterwarnings("ignore", message=".*causal_conv1d.*")

UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # 8 and 11 significand bits
DIAGNOSTICS = ("update", "lens", "cka", "spectra", "effective_rank")


@pytest.fixture(scope="module")
def dory(tmp_path_factory):
    """A tiny Dory (float32 weights) saved with save_pretrained, its size in bytes, and a token file."""
    from transformers import DoryConfig, DoryForCausalLM

    root = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    model = DoryForCausalLM(DoryConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, n_input_layers=1, n_output_layers=1, n_recurrent_loops=3,
        sliding_window=8, max_position_embeddings=128))
    model.save_pretrained(root / "dory")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    np.save(root / "t.npy", torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1)).numpy())
    return {"dir": root / "dory", "size": size, "tokens": root / "t.npy", "root": root}


def _flat(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


KW = dict(probes=True, progress=False, offsets=[0], threads=1, batch_size=4)


def _spread(dory, tmp_path):
    """The model with about half its weights allowed in CPU memory: the rest is offloaded to disk."""
    return hf.load(dory["dir"], device_map="auto", max_memory={"cpu": dory["size"] // 2},
                   offload_folder=tmp_path / "offload")


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
def test_a_half_precision_model_is_analysed_in_float(dory, dtype):
    x = torch.from_numpy(np.load(dory["tokens"]))
    full = dict(_flat(analyze_model(hf.load(dory["dir"]), x, baseline=False, **KW)))
    model = hf.load(dory["dir"], dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    half = dict(_flat(analyze_model(model, x, baseline=False, **KW)))
    assert full.keys() == half.keys() and all(math.isfinite(v) for k, v in half.items() if "p_value" not in k)
    close = [k for k in full if k.split("/")[1] in DIAGNOSTICS and math.isfinite(full[k])]
    assert len(close) > 100
    # Each diagnostic is a mean of norms / losses over many half-precision products: a few roundoffs of its size
    # (measured: at most 0.15 u (1 + |x|) on this model)
    u = UNIT_ROUNDOFF[dtype]
    for k in close:
        assert half[k] == pytest.approx(full[k], rel=4 * u, abs=4 * u), k
    # what every accumulator is fed: float32 states and logits, whatever the weights' dtype
    _, _, cache, logits = next(iter_caches(model, x, state_spec(model).hook_names(), 4))
    assert logits.dtype == torch.float32 and {v.dtype for v in cache.values()} == {torch.float32}


def test_part_of_the_model_on_disk_gives_the_same_loop_states(dory, tmp_path):
    memory, spread = hf.load(dory["dir"]), _spread(dory, tmp_path)
    where = set(spread.hf.hf_device_map.values())
    assert {"cpu", "disk"} <= where, spread.hf.hf_device_map
    assert any(p.device.type == "meta" for p in spread.hf.parameters())  # really offloaded
    x = torch.from_numpy(np.load(dory["tokens"]))
    logits_a, a = memory.run_with_cache(x)
    logits_b, b = spread.run_with_cache(x)
    states = [n for n in a.keys() if n.startswith("loop.") or n in ("hook_embed", "coda.hook_out")]
    assert len([n for n in states if n.endswith("hook_state_out")]) == 3 and set(states) <= set(b.keys())
    for n in states:  # the same kernels on the same weights, read from disk: the same numbers
        assert torch.equal(a[n], b[n]), n
    assert torch.equal(logits_a, logits_b)
    m = analyze_model(spread, x, **KW)
    assert dict(_flat(m))["/lens/model_loss/mean"] == dict(_flat(analyze_model(memory, x, baseline=False, **KW)))[
        "/lens/model_loss/mean"]
    assert m["probes"]["loop_step"] is not None and any("spread over devices" in n for n in m["notes"])


def test_cli_dtype_and_device_map(dory, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["analyze", str(dory["dir"]), "--tokens", str(dory["tokens"]), "--out", str(out), "--dtype",
                 "bfloat16", "--device-map", "auto", "--max-memory", f"cpu={dory['size'] // 2}", "--offload-folder",
                 str(tmp_path / "off"), "--no-progress", "--offsets", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())["models"][0]
    assert m["data"]["n_samples"] == 6 and all(math.isfinite(v) for v in m["update"]["mean"])
    capsys.readouterr()
    assert main(["analyze", str(dory["dir"]), "--tokens", str(dory["tokens"]), "--out", str(tmp_path / "p"),
                 "--offload-folder", str(tmp_path / "off")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need --device-map auto" in err[0] and not (tmp_path / "p").exists()


def test_big_model_flags_refused_in_one_line(dory, tmp_path, capsys):
    from conftest import tiny_cfg

    from meshprobe import build_model, save_checkpoint

    ckpt = save_checkpoint(build_model(tiny_cfg()), tmp_path / "ckpt")
    cases = [([str(ckpt), "--dtype", "bfloat16"], "--dtype applies to transformers model directories only"),
             ([str(ckpt), "--device-map", "auto"], "--device-map applies to transformers model directories only"),
             ([str(dory["dir"]), "--device-map", "auto", "--max-memory", "cpu"], "--max-memory takes DEV=SIZE"),
             ([str(dory["dir"]), "--max-memory", "cpu=1GiB"], "need --device-map auto")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["analyze", *args, "--tokens", str(dory["tokens"]), "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
        assert not (tmp_path / "o").exists()
