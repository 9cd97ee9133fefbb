"""The prepared GPU run (benchmarks/gpu_run.py) in its CPU dry run: every part runs at tiny sizes, so the
script cannot rot between GPU windows."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_run_dry(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--device", "cpu", "--dry",
                           "--out", str(tmp_path), "--budget-s", "400"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_run.json").read_text())["parts"]
    smoke = doc["smoke"]
    assert smoke["all_ok"], smoke
    assert {"vanilla", "base", "mesh", "resume", "analyze", "torchrun"} <= set(smoke)
    assert smoke["torchrun"]["ddp_backend"] == "gloo"  # one process under torchrun still runs through DDP
    assert all(v["ok"] for v in doc["throughput"].values()), doc["throughput"]
    zoo = doc["zoo"]
    assert zoo["calibration"] and zoo["concurrency"] >= 1
    runs = zoo["train"]["runs"]
    assert len(runs) == 14 and all(r["status"] == "completed" for r in runs) and not zoo["train"]["errors"]
    bundle = doc["bundle"]
    assert len(bundle["bundled"]) == 7
    names = set()
    for name in bundle["files"]:
        with tarfile.open(tmp_path / name) as tar:
            names |= set(tar.getnames())
    assert "checkpoints/loop3-mesh/model.safetensors" in names
    assert "checkpoints/results.json" in names and "zoo/results.json" in names
    results = json.loads((tmp_path / "work" / "checkpoints" / "results.json").read_text())
    assert len(results["runs"]) == 14 and all(r["sample_loss"] > 0 for r in results["runs"])
