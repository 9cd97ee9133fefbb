"""Kill real `meshprobe train` / `meshprobe analyze` runs with SIGKILL at every file-system step; used by
tests/test_crash.py (run as ``python tests/crash_driver.py SPEC.json``; writes the JSON result to ``SPEC['result']``).

torch and meshprobe are imported once; every run is a forked child that calls the CLI's ``main``. An audit
hook (``sys.addaudithook``) in the child counts the file-system events below the run's folder (opens for
writing, mkdir, chmod, rename / replace, remove, rmdir: including those inside ``shutil.rmtree``) and sends
SIGKILL to its own process just before event N. A traced uninterrupted run gives the sequence of events, so
for every N the driver knows which save had committed (its ``config.json`` had been written) before the kill.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

WATCH = {"open", "os.mkdir", "os.chmod", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install(root: str, kill_at: int | None, trace: list | None) -> None:
    count = [0]

    def hook(event, args):
        if event not in WATCH:
            return
        path = args[0]
        if event == "open":
            mode, flags = args[1], args[2]
            if not (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & WRITE_FLAGS):
                return
        inside = isinstance(path, str) and path.startswith(root)
        by_fd = event in ("os.remove", "os.rmdir") and isinstance(path, str) and args[-1] is not None
        if not (inside or by_fd):  # by_fd: the unlinks of shutil.rmtree (names relative to a folder fd)
            return
        count[0] += 1
        if trace is not None:
            trace.append([event, path])
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def run_child(argv: list[str], root: Path, kill_at: int | None = None, trace_file: Path | None = None) -> int:
    """Run ``meshprobe ARGV`` in a forked child; its exit code, or -9 when the kill point was reached."""
    from meshprobe.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            trace: list | None = [] if trace_file else None
            _install(str(root), kill_at, trace)
            rc = main(argv)
            if trace_file:
                trace_file.write_text(json.dumps(trace))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(rc)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "out")


def _log(out: Path) -> list[dict]:
    drop = {"tokens_per_s", "elapsed_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def train_kills(spec: dict) -> dict:
    """SIGKILL a training run before each of its file-system events (every `stride`-th, and every rename);
    after each kill: the newest committed step loads, --resume finishes, equal to the uninterrupted run."""
    from meshprobe.checkpoint import CheckpointError, load_checkpoint

    root, argv, steps = Path(spec["root"]), spec["train"], spec["steps"]
    base = root / "base"
    base.mkdir()
    from meshprobe.cli import main

    # in this process, so that every child inherits the warm caches, imports and one-time initialisations
    assert main(argv + ["--out", str(root / "warm" / "out")]) == 0
    trace_file = root / "trace.json"
    assert run_child(argv + ["--out", str(base / "out")], root, trace_file=trace_file) == 0
    trace = json.loads(trace_file.read_text())
    commit = re.compile(r"/\.out\.tmp-[^/]*/config\.json$")
    commits = [i + 1 for i, (event, path) in enumerate(trace) if event == "open" and commit.search(path)]
    assert len(commits) == steps + 1, (commits, steps)  # a save at step 0 and after every step
    base_log, base_weights = _log(base / "out"), (base / "out" / "model.safetensors").read_bytes()
    points = sorted({n for n in range(1, len(trace) + 1)
                     if n % spec["stride"] == 0 or trace[n - 1][0] == "os.rename" or n in commits
                     or n - 1 in commits})
    results = []
    for n in points:
        folder = root / f"k{n}"
        folder.mkdir()
        out = folder / "out"
        rc = run_child(argv + ["--out", str(out)], root, kill_at=n)
        expected = sum(c < n for c in commits) - 1  # the config.json of that many saves was written
        try:
            loaded = load_checkpoint(out).checkpoint_config["metadata"]["step"]
        except CheckpointError as exc:
            loaded = None if expected < 0 else f"error: {exc}"
        rc2 = run_child(argv + ["--out", str(out), "--resume"], root)
        final = _log(out) == base_log and (out / "model.safetensors").read_bytes() == base_weights if rc2 == 0 else False
        results.append({"n": n, "event": trace[n - 1], "rc": rc, "expected": expected if expected >= 0 else None,
                        "loaded": loaded, "resume_rc": rc2, "resume_equal": final, "left": _leftovers(folder)})
        shutil.rmtree(folder)
    return {"events": len(trace), "commits": commits, "results": results}


def _drop_seconds(value):
    if isinstance(value, dict):
        return {k: _drop_seconds(v) for k, v in value.items() if k not in ("seconds", "timing")}
    return [_drop_seconds(v) for v in value] if isinstance(value, list) else value


def _files(folder: Path) -> dict[str, bytes]:
    """The files of an analysis folder; metrics.json without its wall times ("seconds", per-phase "timing"; every
    other byte is reproducible)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    for name, data in files.items():
        if name.endswith("metrics.json"):
            try:
                files[name] = json.dumps(_drop_seconds(json.loads(data)), sort_keys=True).encode()
            except ValueError:
                pass  # torn: it will match neither version
    return files


def analyze_kills(spec: dict) -> dict:
    """SIGKILL `meshprobe analyze` into a folder holding an older result (another --seed) while it plots, at
    renames that publish its files and while it removes its staging folder; after each kill every file is the old or the new version, a new metrics.json
    comes with new versions of every file, and a rerun completes and leaves nothing beside the folder."""
    root, argv, ckpt = Path(spec["root"]), spec["analyze"], spec["checkpoint"]
    from meshprobe.cli import main

    runs = {}
    for seed in ("0", "1"):
        folder = root / f"a{seed}"
        folder.mkdir()
        trace_file = root / f"atrace{seed}.json"
        if seed == "0":  # in this process: the children inherit matplotlib's imports and font cache
            assert main(["analyze", ckpt, *argv, "--seed", seed, "--out", str(folder / "out")]) == 0
        else:
            assert run_child(["analyze", ckpt, *argv, "--seed", seed, "--out", str(folder / "out")], root,
                             trace_file=trace_file) == 0
        runs[seed] = _files(folder / "out")
    trace = json.loads((root / "atrace1.json").read_text())
    publish = [i + 1 for i, (event, path) in enumerate(trace) if event == "os.rename" and "/.out.tmp-" in path]
    first_write = next(i + 1 for i, (event, path) in enumerate(trace) if event == "open")
    # inside the plotting, the first, the report.md and the metrics.json rename, the staging removal
    points = sorted({first_write, publish[0], *publish[-2:], publish[-1] + 1})
    old, new = runs["0"], runs["1"]
    results = []
    for n in points:
        folder = root / f"ak{n}"
        shutil.copytree(root / "a0" / "out", folder / "out")
        out = folder / "out"
        rc = run_child(["analyze", ckpt, *argv, "--seed", "1", "--out", str(out)], root, kill_at=n)
        files = _files(out)
        kinds = {name: "new" if data == new.get(name) else "old" if data == old.get(name) else "torn"
                 for name, data in files.items()}
        rc2 = run_child(["analyze", ckpt, *argv, "--seed", "1", "--out", str(out)], root)
        results.append({"n": n, "event": trace[n - 1], "rc": rc, "kinds": kinds,
                        "rerun_rc": rc2, "rerun_equal": _files(out) == new, "left": _leftovers(folder)})
        shutil.rmtree(folder)
    return {"events": len(trace), "results": results}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    result = {}
    t0 = time.time()
    if spec.get("train"):
        result["train"] = train_kills(spec)
    t1 = time.time()
    if spec.get("analyze"):
        result["analyze"] = analyze_kills(spec)
    result["seconds"] = {"train": round(t1 - t0, 1), "analyze": round(time.time() - t1, 1)}
    Path(spec["result"]).write_text(json.dumps(result))
