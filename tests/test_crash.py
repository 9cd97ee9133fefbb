"""Crash safety: SIGKILL real `meshprobe train` and `meshprobe analyze` runs at many file-system steps
(tests/crash_driver.py forks one child per kill point), plus the recovery rules on hand-made leftovers.

Training: a d16 model, a save after every step. For each kill point the newest committed step must load
(``load_checkpoint``), ``--resume`` must finish, and its log and weights must equal an uninterrupted run's,
with no leftover folder or lock beside the output. Analysis: every file in --out is the old or the new
version after a kill (never torn), a new metrics.json comes with new versions of every file, and a rerun
completes cleanly. About a minute on 2 CPU cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_text_run
from meshprobe.cli import main

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    _, preset = write_tiny_text_run(root, steps=STEPS, extra="save_every = 1\n")
    return {"root": root, "preset": preset}


@pytest.mark.slow
def test_sigkill_anywhere_in_train_and_analyze(setup):
    root = setup["root"]
    runs = root / "runs"
    runs.mkdir()
    spec = {"root": str(runs), "result": str(root / "result.json"), "steps": STEPS, "stride": 2,
            "train": ["train", "--config", str(setup["preset"]), "--quiet"],
            "checkpoint": str(runs / "base" / "out"),
            "analyze": ["--samples", "4", "--seq-len", "8", "--no-probes", "--lens-positions", "2", "--no-progress"]}
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", SOURCE_DATE_EPOCH="0", MESHPROBE_CACHE=str(root / "cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "crash_driver.py"), str(root / "spec.json")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((root / "result.json").read_text())

    train = result["train"]
    assert len(train["commits"]) == STEPS + 1 and len(train["results"]) >= 20
    loaded_once = False
    for r in train["results"]:
        where = f"kill before event {r['n']} {r['event']}"
        assert r["rc"] == -9, where  # the kill point was reached
        assert r["loaded"] == r["expected"], where  # the newest committed step, never an older one or none
        loaded_once = loaded_once or r["loaded"] is not None
        assert r["loaded"] is not None or not loaded_once, where  # once loadable, always loadable
        assert r["resume_rc"] == 0 and r["resume_equal"], where  # resume finishes = the uninterrupted run
        assert r["left"] == [], where  # recovery removed every leftover folder and the lock
    assert loaded_once and any(r["event"][0] == "os.rename" for r in train["results"])

    analyze = result["analyze"]
    assert len(analyze["results"]) >= 5
    seen = set()
    for r in analyze["results"]:
        where = f"kill before event {r['n']} {r['event']}"
        kinds = r["kinds"]
        assert r["rc"] == -9, where
        assert "metrics.json" in kinds and "torn" not in kinds.values(), (where, kinds)
        if kinds["metrics.json"] == "new":
            assert set(kinds.values()) == {"new"}, (where, kinds)
        seen.add(frozenset(kinds.values()))
        assert r["rerun_rc"] == 0 and r["rerun_equal"] and r["left"] == [], where
    assert {frozenset({"old"}), frozenset({"old", "new"}), frozenset({"new"})} <= seen  # kills hit every phase


# --------------------------------------------------------------------------------------------- recovery rules
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two complete checkpoints of one model at different 'steps' (saved with save_checkpoint)."""
    from meshprobe import ModelConfig, save_checkpoint
    from meshprobe.model import build_model

    root = tmp_path_factory.mktemp("leftovers")
    model = build_model(ModelConfig(d_model=16, n_heads=2, vocab_size=50, n_ctx=16, layout="1+1R2+1"))
    for step in (1, 2):
        save_checkpoint(model, root / f"s{step}", step=step)
    return root


def _step(path):
    from meshprobe import load_checkpoint

    return load_checkpoint(path).checkpoint_config["metadata"]["step"]


def _place(src, dest):
    import shutil

    shutil.copytree(src, dest)


@pytest.mark.parametrize("case", ["missing-out", "tmp-newer", "old-only", "torn-tmp"])
def test_reader_finds_newest_complete_and_recovery_puts_it_in_place(ckpts, tmp_path, case, capsys):
    from meshprobe.checkpoint import recover_checkpoint

    out = tmp_path / "out"
    dead = 2 ** 22 + 1  # a pid that is not running
    tmp = tmp_path / f".out.tmp-{10 ** 19:020d}-{dead}-abc"
    old = tmp_path / f".out.old-{10 ** 18:020d}-{dead}"
    if case == "missing-out":  # killed between the two renames of a switch
        _place(ckpts / "s1", old)
        _place(ckpts / "s2", tmp)
        want = 2
    elif case == "tmp-newer":  # killed after the new checkpoint was complete, before the switch
        _place(ckpts / "s1", out)
        _place(ckpts / "s2", tmp)
        want = 2
    elif case == "old-only":
        _place(ckpts / "s1", old)
        want = 1
    else:  # a temp folder whose config.json is torn is not a checkpoint
        _place(ckpts / "s1", out)
        _place(ckpts / "s2", tmp)
        (tmp / "config.json").write_text((tmp / "config.json").read_text()[:50])
        want = 1
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _step(out) == want
    assert main(["info", str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # reading changes nothing
    recover_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and _step(out) == want
