"""`meshprobe analyze --dynamics --tuned-lens` end to end: tiny checkpoints and a transformers directory, the
documented keys, the saved lens, and bad input (one line, exit 2, nothing written)."""
import json

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_cfg

from meshprobe import save_checkpoint
from meshprobe.analysis.pipeline import schema
from meshprobe.cli import main

SMALL = ["--no-probes", "--no-progress", "--dynamics-samples", "2", "--dynamics-seq-len", "8", "--dynamics-iters",
         "4", "--lens-samples", "8", "--lens-fit-steps", "3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    out = {}
    for name, variant, layout in (("base", "base", "1+2R3+1"), ("mesh", "mesh", "1+2R3+1"),
                                  ("van", "vanilla", "5")):
        out[name] = save_checkpoint(random_model(tiny_cfg(variant=variant, layout=layout), seed=1), root / name)
    out["other"] = save_checkpoint(random_model(tiny_cfg(variant="base"), seed=2), root / "other")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 97, size=(8, 16)).astype(np.int32))
    out["tokens"] = root / "tokens.npy"
    out["root"] = root
    from meshprobe import load_checkpoint
    from meshprobe.dynamics.analyze import lens_section

    lens, _ = lens_section(load_checkpoint(out["base"]), torch.from_numpy(np.load(out["tokens"])).long(), fit_steps=0)
    out["lens"] = lens.save(root / "lens_base")
    return out


def _dynamic_paths(doc) -> set[str]:
    return {p for p in schema.metric_key_paths(doc) if p.startswith(schema.OPTIONAL_SECTIONS)}


@pytest.mark.slow
def test_analyze_dynamics_and_tuned_lens(ckpts):
    out = ckpts["root"] / "out"
    assert main(["analyze", str(ckpts["base"]), str(ckpts["mesh"]), "--out", str(out), "--tokens",
                 str(ckpts["tokens"]), "--dynamics", "--tuned-lens", *SMALL]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    documented = {k for k in schema.METRICS_KEYS if k.startswith(schema.OPTIONAL_SECTIONS)}
    written = _dynamic_paths(doc)
    assert written - documented == set(), "dynamics keys written but not documented in METRICS_KEYS"
    assert documented - written == set(), "documented dynamics keys that were not written"
    base, mesh = doc["models"]
    assert base["dynamics"]["trajectory"]["steps"] == 12 and mesh["dynamics"]["trajectory"]["steps"] == 3
    assert "all_steps" in base["dynamics"]["exits"] and "all_steps" not in mesh["dynamics"]["exits"]
    assert base["tuned_lens"]["states"] == ["h^(0)", "h^(1)", "h^(2)", "h^(3)"]
    assert base["tuned_lens"]["saved"] == "base/tuned_lens" and (out / "base" / "tuned_lens" / "tuned_lens.json").is_file()
    for stem in ("dynamics", "lens_kl"):
        assert (out / f"{stem}.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "**Loop dynamics**" in report and "**Tuned lens** (fitted" in report
    # the saved lens, scored again instead of fitted
    again = ckpts["root"] / "again"
    assert main(["analyze", str(ckpts["base"]), "--out", str(again), "--tokens", str(ckpts["tokens"]), "--lens",
                 str(out / "base" / "tuned_lens"), *SMALL]) == 0
    lens = json.loads((again / "metrics.json").read_text())["models"][0]["tuned_lens"]
    assert lens["fitted"] is False and lens["saved"] is None
    assert lens["kl"]["tuned"] == pytest.approx(base["tuned_lens"]["kl"]["tuned"], rel=1e-4)


@pytest.mark.parametrize("case", ["vanilla", "mesh_steps", "other_lens", "not_a_lens", "iters"])
def test_bad_input_is_one_line_and_writes_nothing(ckpts, capsys, case):
    out = ckpts["root"] / f"bad-{case}"
    ckpt, extra, want = {
        "vanilla": (ckpts["van"], ["--dynamics"], "has no loop steps"),
        "mesh_steps": (ckpts["mesh"], ["--dynamics", "--dynamics-steps", "5"],
                       "--dynamics-steps 5: "),
        "other_lens": (ckpts["other"], ["--lens", str(ckpts["lens"])],
                       "was fitted on another model"),
        "not_a_lens": (ckpts["base"], ["--lens", str(ckpts["base"])], "is not a saved tuned lens"),
        "iters": (ckpts["base"], ["--dynamics", "--dynamics-iters", "2"], "--dynamics-iters 2 must be >= "),
    }[case]
    capsys.readouterr()
    assert main(["analyze", str(ckpt), "--out", str(out), "--tokens", str(ckpts["tokens"]), *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and want in err, err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")
                                     and not p.name.endswith(".lock")]


@pytest.mark.slow
def test_analyze_dynamics_on_a_transformers_directory(tmp_path):
    from transformers import DoryConfig, DoryForCausalLM

    torch.manual_seed(0)
    DoryForCausalLM(DoryConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, n_input_layers=1, n_output_layers=1, n_recurrent_loops=2,
        sliding_window=8, max_position_embeddings=64)).save_pretrained(tmp_path / "dory")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 64, size=(8, 12)).astype(np.int32))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "dory"), "--out", str(out), "--tokens", str(tmp_path / "tokens.npy"),
                 "--dynamics", "--tuned-lens", *SMALL]) == 0
    m = json.loads((out / "metrics.json").read_text())["models"][0]
    assert m["dynamics"]["trajectory"]["steps"] == 8 and len(m["dynamics"]["trajectory"]["rho"]) == 8
    assert m["tuned_lens"]["kl"]["coda"] == [None, None, None] and m["tuned_lens"]["states"][-1] == "h^(2)"
    assert (out / "dynamics.png").is_file() and (out / "dory" / "tuned_lens" / "tuned_lens.json").is_file()
