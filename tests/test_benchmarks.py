"""The CPU benchmarks that no other test runs, at tiny sizes, so they cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import approx_f32

ROOT = Path(__file__).resolve().parents[1]


def test_mesh_cost_tiny():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mesh_cost.py"), "--d-model", "32", "--heads",
                           "2", "--vocab", "64", "--seq", "16", "--batch", "2", "--turns", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "MeSH, routers only", "MeSH"]
    assert rows[0].split("|")[3].strip().startswith("1.000")


def test_mesh_stall_tiny(tmp_path):
    """benchmarks/mesh_stall.py on a 4-step d32 +mesh task run that keeps a snapshot every 2 steps."""
    import json

    from meshprobe.cli import main

    run = tmp_path / "m-s0"
    assert main(["train", "--config", "cpu-zoo", "--out", str(run), "--quiet", "--d-model", "32", "--n-heads", "2",
                 "--vocab-size", "10", "--n-ctx", "13", "--layout", "1+1R2+1", "--variant", "mesh", "--data",
                 "task:phop:hops=2,symbols=8,seq_len=12,mix=1", "--batch-size", "8", "--steps", "4",
                 "--eval-every", "2", "--eval-batches", "1", "--keep-every", "2"]) == 0
    out = tmp_path / "stall.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mesh_stall.py"), "--runs", str(run),
                           "--every", "2", "--sequences", "24", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    snaps = doc["runs"][0]["snapshots"]
    assert [s["step"] for s in snaps] == [0, 2, 4] and out.with_suffix(".png").stat().st_size > 5000
    router = snaps[0]["router"]
    assert router["steps"] == ["entry", "loop 1", "loop 2"] and len(router["read"][0]) == router["slots"] == 5
    # softmax weights over the slots (float32) averaged over tokens: they sum to 1 up to float32 rounding
    assert all(sum(w) == approx_f32(1.0, router["slots"]) for w in router["read"] + router["write"])
    assert snaps[-1]["latent_map"]["states"][:2] == ["h_emb", "h^(0)"] and "h^(2)" in snaps[-1]["patching"]["sites"]


def test_hf_scale_tiny(tmp_path):
    """benchmarks/hf_scale.py at toy sizes: both shapes built, run plainly and analysed in their own processes;
    every token probe ran on every state, the phases of the analysis are timed."""
    import json

    out = tmp_path / "hf_scale.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hf_scale.py"), "--tiny", "--threads", "1",
                           "--out", str(out), "--tmp", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"ouro", "huginn"}
    for r in doc["results"].values():
        assert r["command"].startswith("python benchmarks/hf_scale.py --tiny")
        an = r["analyze"]
        assert r["every_token_probe_on_every_state"] and len(an["offsets"]) == 6 and an["loop_step_probe"]
        assert r["forward"]["forward_seconds"] > 0 and r["forward"]["peak_rss_mib"] > 100
        assert {"forward", "lens", "diagnostics", "cka", "token_probes", "loop_step_probe"} <= set(an["timing"])
        assert sum(r["phase_share"].values()) == pytest.approx(1.0)
        assert r["time_ratio"] == pytest.approx(an["wall_seconds"] / r["forward"]["wall_seconds"])
    assert doc["results"]["huginn"]["analyze"]["states"][-2] == "h^(3)"  # --loops 3 at toy size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hf_scale-")]  # temporary models removed
