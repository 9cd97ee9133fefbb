"""The CPU benchmarks that no other test runs, at tiny sizes, so they cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

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
