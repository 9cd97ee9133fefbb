"""One prepared GPU window, fully used: smoke every CUDA path, measure throughput, train the zoo far longer.

    # on the GPU machine (no package registry there): wheels and the packed corpus travel with the tree
    python3 benchmarks/gpu_run.py --wheels .whl --corpus .gpu/mix.txt.xz --out $OUT --budget-s 300
    # the CPU dry run the test suite runs (tiny sizes, seconds)
    python benchmarks/gpu_run.py --device cpu --dry --out /tmp/gpu-dry

Parts, in order of value; each writes its results into OUT/gpu_run.json as soon as it finishes (atomic), so a
run cut off by its budget or by a kill still returns what it did; a part that would not fit the time left is
recorded as skipped:
  a. smoke      a few bf16 training steps of every variant, resume (stop halfway, continue), `--compile` on one,
                `meshprobe analyze` on CUDA, a 1-process `torchrun` (NCCL backend); pass/fail per path
  b. throughput benchmarks/train_throughput.py at d512 L6 and d768 L12 (seq 512, batch 32, vocab 8192): ours vs
                HF GPTNeoXForCausalLM, eager and compiled, base vs MeSH, MFU
  c. zoo        the bundled d128 `1+2R3+1` family and its vanilla (vocab 4096, the packed mix, the bundled
                tokenizer): vanilla, vanilla with scale_embeddings, base, +residual, +anchor, +anchor*, +mesh with
                4 seeds; several trainings at once on the one GPU (the count is measured first: the one with the
                most total tokens/s wins); tokens per run set from that rate to fill the remaining budget
  d. bundle     seed 0 of every zoo model (fp16) with results.json, the validation sample and every run's log,
                as tar files under OUT (each under the 16 MiB a returned file may have)

The text comes as one packed corpus (`meshprobe data pack --data mix --out .gpu/mix.txt.xz`) because the Debian
sources of `--data mix` are not installed on the GPU machine; it is tokenized once there (16 cores) into a
shared cache that every training process memory-maps. Wheels (`--wheels DIR`) are installed with
`pip --no-index --target` into a private folder that every subprocess sees through PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's meshprobe, installed or not
TOKENIZER = ROOT / "checkpoints" / "loop3-base" / "tokenizer.json"  # the bundled zoo's vocab-4096 mix tokenizer
SMOKE_VARIANTS = ["vanilla", "base", "residual", "anchor", "anchor_emb", "residual+anchor", "static_comb",
                  "dynamic_comb", "mesh"]
ZOO_RUNS = [  # (name, layout, variant, extra model keys): the bundled family
    ("loop3-vanilla", "8", "vanilla", {}),
    ("loop3-vanilla_scaled", "8", "vanilla", {"scale_embeddings": True}),
    ("loop3-base", "1+2R3+1", "base", {}),
    ("loop3-residual", "1+2R3+1", "residual", {}),
    ("loop3-anchor", "1+2R3+1", "anchor", {}),
    ("loop3-anchor_emb", "1+2R3+1", "anchor_emb", {}),
    ("loop3-mesh", "1+2R3+1", "mesh", {}),
]
RETURN_LIMIT = 15 * 2**20  # a returned file may have 16 MiB; keep a margin


# --------------------------------------------------------------------------------------------- plumbing
class Run:
    """The run's clock, its results document and its log."""

    def __init__(self, out: Path, budget_s: float, dry: bool, device: str) -> None:
        self.out, self.dry, self.device = out, dry, device
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.work = out / "work" if dry else Path(os.environ.get("GPU_RUN_WORK", "/tmp/gpu_run"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", MESHPROBE_CACHE=str(self.work / "cache"))
        self.doc: dict = {"budget_s": budget_s, "dry": dry, "device": device, "parts": {}}
        self.log = open(out / "run.log", "a", encoding="utf-8")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def record(self, part: str, value) -> None:
        from meshprobe._io import write_json

        self.doc["parts"][part] = value
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_json(self.out / "gpu_run.json", self.doc, indent=1)

    def sh(self, cmd: list[str], timeout: float, name: str) -> dict:
        """Run a command with the run's environment; its output goes to the log; never raises."""
        timeout = max(1.0, min(timeout, self.left()))
        self.say(f"$ {' '.join(cmd)}  (limit {timeout:.0f} s)")
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, output = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = "timeout", _text(exc.stdout) + _text(exc.stderr)
        self.log.write(f"--- {name} (rc {rc}) ---\n{output[-20000:]}\n")
        self.log.flush()
        return {"ok": rc == 0, "rc": rc, "seconds": round(time.monotonic() - t, 1),
                **({} if rc == 0 else {"tail": output[-1500:]})}


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def python() -> str:
    return sys.executable


def install_wheels(run: Run, wheels: Path) -> None:
    site = run.work / "site"
    cmd = [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))]
    result = run.sh(cmd, 120, "wheels")
    if not result["ok"]:
        raise SystemExit(f"gpu_run: installing the wheels failed: {result.get('tail')}")
    run.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site)])
    sys.path.insert(1, str(site))  # after the repository (ROOT is first)


# --------------------------------------------------------------------------------------------- configs
def sizes(dry: bool) -> dict:
    """Model / batch sizes: the real ones, or tiny ones for the CPU dry run."""
    if dry:
        return dict(d_model=32, n_heads=4, seq_len=16, batch_size=4, smoke_steps=2, n_ctx=32)
    return dict(d_model=128, n_heads=4, seq_len=128, batch_size=32, smoke_steps=6, n_ctx=256)


def train_configs(dry: bool, device: str, corpus: str, layout: str, variant: str, seed: int = 0, **train_over):
    from meshprobe import ModelConfig
    from meshprobe.training import TrainConfig

    s = sizes(dry)
    extra = train_over.pop("model_extra", {})
    model_cfg = ModelConfig(d_model=s["d_model"], n_heads=s["n_heads"], vocab_size=4096, n_ctx=s["n_ctx"],
                            layout=layout, variant=variant, **extra)
    train = dict(data=corpus, tokenizer=str(TOKENIZER), seq_len=s["seq_len"], batch_size=s["batch_size"],
                 steps=s["smoke_steps"], lr=2e-3, eval_every=0, eval_batches=2, log_every=1, save_every=0,
                 device=device, seed=seed)
    train.update(train_over)
    return model_cfg, TrainConfig(**train)


def preset_file(run: Run, corpus: str, name: str, layout: str, variant: str, **train_over) -> Path:
    """A [model] + [train] TOML for the CLI smoke steps."""
    model_cfg, train_cfg = train_configs(run.dry, run.device, corpus, layout, variant, **train_over)
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in model_cfg.to_dict().items() if v is not None]
    lines += ["[train]"] + [f"{k} = {json.dumps(v)}" for k, v in train_cfg.to_dict().items() if v is not None]
    path = run.work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------- a. smoke
def worker_smoke(args) -> int:
    """In one process: a few steps of every variant, then stop-and-resume on one. Writes a JSON report."""
    from meshprobe.training import train

    report = {}
    for variant in SMOKE_VARIANTS:
        layout = "4" if variant == "vanilla" else "1+2R3+1"
        t = time.monotonic()
        try:
            model_cfg, train_cfg = train_configs(args.dry, args.device, args.corpus, layout, variant)
            summary = train(model_cfg, train_cfg, Path(args.work) / f"smoke-{variant}", overwrite=True, quiet=True)
            report[variant] = {"ok": summary["status"] == "completed" and summary["train_loss"] == summary[
                "train_loss"], "train_loss": summary["train_loss"], "device": summary["device"],
                "seconds": round(time.monotonic() - t, 1)}
        except Exception as exc:  # a smoke test reports every failure and goes on
            report[variant] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    t = time.monotonic()
    try:
        out = Path(args.work) / "smoke-resume"
        steps = sizes(args.dry)["smoke_steps"]
        model_cfg, train_cfg = train_configs(args.dry, args.device, args.corpus, "1+2R3+1", "mesh",
                                             stop_after=steps // 2)
        first = train(model_cfg, train_cfg, out, overwrite=True, quiet=True)
        model_cfg, train_cfg = train_configs(args.dry, args.device, args.corpus, "1+2R3+1", "mesh")
        second = train(model_cfg, train_cfg, out, resume=True, quiet=True)
        report["resume"] = {"ok": first["status"] == "stopped" and second["status"] == "completed"
                            and second["step"] == steps, "stopped_at": first["step"], "final_step": second["step"],
                            "seconds": round(time.monotonic() - t, 1)}
    except Exception as exc:
        report["resume"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


def smoke(run: Run, corpus: str) -> dict:
    res: dict = {}
    report = run.work / "smoke.json"
    r = run.sh([python(), __file__, "_smoke", "--corpus", corpus, "--work", str(run.work), "--report", str(report),
                "--device", run.device] + (["--dry"] if run.dry else []), 240, "smoke variants")
    res["variants_process"] = r
    if report.is_file():
        res.update(json.loads(report.read_text()))
    run.record("smoke", res)
    meshprobe = [python(), "-m", "meshprobe"]
    if run.dry:
        res["compile"] = {"ok": None, "skipped": "dry run (compiling on CPU takes minutes)"}
    else:
        cfg = preset_file(run, corpus, "smoke-compile", "1+2R3+1", "mesh", steps=8)
        res["compile"] = run.sh(meshprobe + ["train", "--config", str(cfg), "--compile", "--quiet", "--overwrite",
                                             "--out", str(run.work / "smoke-compile")], 150, "compile")
    run.record("smoke", res)
    n = 8 if run.dry else 64
    res["analyze"] = run.sh(meshprobe + ["analyze", str(run.work / "smoke-mesh"), "--out",
                                         str(run.work / "smoke-analyze"), "--samples", str(n), "--seq-len",
                                         str(sizes(run.dry)["seq_len"]), "--device", run.device, "--no-progress"],
                            120, "analyze")
    run.record("smoke", res)
    cfg = preset_file(run, corpus, "smoke-ddp", "1+2R3+1", "base")
    out = run.work / "smoke-torchrun"
    torchrun = [python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                "meshprobe", "train", "--config", str(cfg), "--quiet", "--overwrite", "--out", str(out)]
    res["torchrun"] = run.sh(torchrun, 120, "torchrun")
    if res["torchrun"]["ok"]:
        meta = json.loads((out / "config.json").read_text())["metadata"]
        res["torchrun"]["ddp_backend"] = meta.get("ddp_backend")
        res["torchrun"]["ok"] = meta.get("ddp_backend") == ("nccl" if run.device.startswith("cuda") else "gloo")
    res["all_ok"] = all(v.get("ok") in (True, None) for v in res.values() if isinstance(v, dict))
    run.record("smoke", res)
    return res


# --------------------------------------------------------------------------------------------- b. throughput
def throughput(run: Run) -> dict:
    res: dict = {}
    shapes = [("d512_L6", 512, 6), ("d768_L12", 768, 12)]
    if run.dry:
        shapes = [("d32_L3", 32, 3)]
    for name, d, layers in shapes:
        # Compiling four models takes minutes: compile at d768 only when the zoo keeps ~4 minutes anyway.
        compiled = d == 512 or run.left() > 420
        estimate = 150 if compiled else 45
        if run.left() < estimate + 200 and not run.dry:  # keep time for the zoo, the most valuable part left
            res[name] = {"skipped": f"{run.left():.0f} s left"}
            continue
        path = run.work / f"throughput-{name}.json"
        cmd = [python(), str(ROOT / "benchmarks" / "train_throughput.py"), "--device", run.device, "--d-model",
               str(d), "--layers", str(layers), "--json", str(path)]
        cmd += (["--seq", "16", "--batch", "2", "--vocab", "256", "--steps", "1", "--warmup", "1", "--repeats", "1"]
                if run.dry else ["--seq", "512", "--batch", "32", "--vocab", "8192", "--steps", "10", "--warmup",
                                 "3", "--repeats", "3"] + (["--compile"] if compiled else []))
        r = run.sh(cmd, estimate * 1.6, f"throughput {name}")
        res[name] = {**r, **(json.loads(path.read_text()) if path.is_file() else {})}
        run.record("throughput", res)
    run.record("throughput", res)
    return res


# --------------------------------------------------------------------------------------------- c. zoo
def zoo_spec(run: Run, corpus: str, path: Path, tokens: int, seeds: list[int], prefix: str = "") -> Path:
    """A zoo spec (meshprobe.paper.zoo format) for the bundled family at `tokens` training tokens per run."""
    s = sizes(run.dry)
    steps = max(2, tokens // (s["batch_size"] * s["seq_len"]))
    over = dict(data=corpus, tokenizer=str(TOKENIZER), vocab_size=4096, d_model=s["d_model"], n_heads=s["n_heads"],
                n_ctx=s["n_ctx"], seq_len=s["seq_len"], batch_size=s["batch_size"], steps=steps, lr=2e-3,
                eval_every=max(1, steps // 4), eval_batches=20 if not run.dry else 2, log_every=max(1, steps // 50),
                save_every=max(1, steps // 2), device=run.device)
    lines = [f"description = {json.dumps(describe_zoo(run, steps))}", 'preset = "cpu-zoo"', "", "[overrides]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in over.items()]
    for name, layout, variant, extra in ZOO_RUNS:
        lines += ["", "[[run]]", f'name = "{prefix}{name}"', 'group = "loop3"', f"seeds = {json.dumps(seeds)}",
                  f'layout = "{layout}"', f'variant = "{variant}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["", "[bundle]", f"runs = {json.dumps([prefix + r[0] for r in ZOO_RUNS])}",
              f"samples = {8 if run.dry else 500}", f"seq_len = {s['seq_len']}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def describe_zoo(run: Run, steps: int) -> str:
    s = sizes(run.dry)
    return (f"GPU zoo (benchmarks/gpu_run.py, one H100): the 3-loop family 1+2R3+1 and its 8-layer vanilla (also "
            f"with scale_embeddings), d{s['d_model']}, vocab 4096, the packed mix corpus, {steps} steps x "
            f"{s['batch_size']} x {s['seq_len']} tokens per run, bf16; several runs at once on the one GPU")


def worker_zoo(args) -> int:
    """Train the named runs of a zoo spec one after another in this process; print tokens/s per run as JSON."""
    import torch

    from meshprobe.training import train
    from meshprobe.paper.zoo import load_zoo, run_configs

    torch.set_num_threads(args.threads)
    spec = load_zoo(args.spec)
    wanted = args.runs.split(",")
    for run in [r for r in spec.runs if r.run_id in wanted]:
        model_cfg, train_cfg = run_configs(spec, run, str(TOKENIZER))
        t = time.monotonic()
        summary = train(model_cfg, train_cfg, Path(args.zoo_out) / run.run_id, resume=True, quiet=True)
        seconds = time.monotonic() - t
        print(json.dumps({"run": run.run_id, "status": summary["status"], "seconds": round(seconds, 2),
                          "tokens": summary["tokens_seen"], "tokens_per_s": summary.get("tokens_per_s")}), flush=True)
    return 0


def run_workers(run: Run, spec: Path, zoo_out: Path, run_ids: list[str], count: int, timeout: float) -> dict:
    """Train `run_ids` in `count` concurrent processes (round-robin); return per-run results and totals."""
    queues = [run_ids[i::count] for i in range(count)]
    threads = max(1, (os.cpu_count() or 2) // count)
    t = time.monotonic()
    procs = [subprocess.Popen([python(), __file__, "_zoo", "--spec", str(spec), "--zoo-out", str(zoo_out), "--runs",
                               ",".join(q), "--threads", str(threads)], cwd=ROOT, env=run.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for q in queues if q]
    rows, errors = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            errors.append("timeout")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if p.returncode:
            errors.append(err[-800:])
            run.log.write(f"--- zoo worker rc {p.returncode} ---\n{err[-5000:]}\n")
    wall = time.monotonic() - t
    tokens = sum(r["tokens"] for r in rows)
    # While all processes train at once, the total rate is the sum of their rates (process start-up excluded).
    concurrent = round(sum(r["tokens"] / r["seconds"] for r in rows if r["seconds"] > 0) * len(procs) / max(1, len(rows)))
    return {"processes": len(procs), "threads_each": threads, "wall_s": round(wall, 1), "tokens": tokens,
            "tokens_per_s_wall": round(tokens / wall), "tokens_per_s": concurrent, "runs": rows, "errors": errors}


def zoo(run: Run, corpus: str) -> dict | None:
    res: dict = {}
    zoo_out = run.work / "zoo"
    zoo_out.mkdir(exist_ok=True)
    shutil.copyfile(TOKENIZER, zoo_out / "tokenizer.json")  # the zoo's shared tokenizer = the bundled one
    seeds = [0, 1] if run.dry else [0, 1, 2, 3]
    n_runs = len(ZOO_RUNS) * len(seeds)
    # 1. How many trainings at once? Short runs at two counts that divide the run list evenly.
    counts = [2] if run.dry else [7, 14]
    if run.concurrency:  # measured before: skip the calibration
        counts = []
    calib_tokens = 150 * sizes(run.dry)["batch_size"] * sizes(run.dry)["seq_len"] if not run.dry else 64
    best = {"count": run.concurrency, "tokens_per_s": run.rate} if run.concurrency else None
    res["calibration"] = [] if best is None else [{"given": best}]
    for count in counts:
        if not run.dry and run.left() < 150:
            break
        spec = zoo_spec(run, corpus, run.work / f"calib-{count}.toml", calib_tokens, list(range(count)),
                        prefix=f"calib{count}-")
        ids = [f"calib{count}-loop3-{'base' if i % 2 else 'mesh'}-s{i}" for i in range(count)]
        r = run_workers(run, spec, run.work / f"calib-{count}", ids, count, 90)
        res["calibration"].append({k: v for k, v in r.items() if k != "runs"})
        run.record("zoo", res)
        if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
            best = {"count": count, "tokens_per_s": r["tokens_per_s"]}
    if best is None or not best["tokens_per_s"]:
        res["skipped"] = "no time left for calibration"
        run.record("zoo", res)
        return None
    # 2. The zoo: tokens per run from the measured rate, to end ~60 s before the budget (bundling needs it).
    reserve = 20 if run.dry else 75
    wall = run.left() - reserve
    per_run = int(best["tokens_per_s"] * 0.85 * wall / n_runs) if not run.dry else 256
    per_run = min(per_run, 40_000_000)
    if per_run < 500_000 and not run.dry:
        res["skipped"] = f"only {per_run:,} tokens per run would fit"
        run.record("zoo", res)
        return None
    spec = zoo_spec(run, corpus, zoo_out / "zoo-gpu-d128.toml", per_run, seeds)
    res.update(concurrency=best["count"], tokens_per_run_planned=per_run, spec=spec.read_text())
    run.record("zoo", res)
    ids = [f"{name}-s{seed}" for seed in seeds for name, *_ in ZOO_RUNS]  # seed 0 of every model first
    r = run_workers(run, spec, zoo_out, ids, best["count"], max(10.0, run.left() - 30))
    res["train"] = r
    run.record("zoo", res)
    return {"spec": spec, "out": zoo_out}


# --------------------------------------------------------------------------------------------- d. bundle
def bundle(run: Run, zoo_info: dict) -> dict:
    import torch

    from meshprobe.paper.zoo import bundle as zoo_bundle
    from meshprobe.paper.zoo import collect_results, load_zoo

    torch.set_num_threads(os.cpu_count() or 1)
    spec = load_zoo(str(zoo_info["spec"]))
    out = zoo_info["out"]
    rows = collect_results(spec, out)
    complete = {r["name"] for r in rows if r["seed"] == 0 and r.get("status") == "completed"}
    spec.bundle_runs = [n for n in spec.bundle_runs if n in complete]
    dest = run.work / "checkpoints"
    zoo_bundle(spec, out, dest)
    shutil.copyfile(zoo_info["spec"], dest / "zoo-gpu-d128.toml")
    # Split into tar files that each fit the return limit.
    parts, current, size = [], [], 0
    for item in sorted(dest.iterdir()):
        item_size = sum(f.stat().st_size for f in item.rglob("*")) if item.is_dir() else item.stat().st_size
        if current and size + item_size > RETURN_LIMIT:
            parts.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    parts.append(current)
    names = []
    for i, items in enumerate(parts):
        name = f"checkpoints-{i}.tar"
        with tarfile.open(run.out / name, "w") as tar:
            for item in items:
                tar.add(item, arcname=f"checkpoints/{item.name}")
        names.append(name)
    with tarfile.open(run.out / "zoo-logs.tar.gz", "w:gz") as tar:  # every run's log and state summary
        for d in sorted(p for p in out.iterdir() if p.is_dir()):
            for f in ("train_log.jsonl", "config.json"):
                if (d / f).is_file():
                    tar.add(d / f, arcname=f"zoo/{d.name}/{f}")
        tar.add(out / "results.json", arcname="zoo/results.json")
    res = {"bundled": spec.bundle_runs, "files": names + ["zoo-logs.tar.gz"], "runs_collected": len(rows)}
    run.record("bundle", res)
    return res


# --------------------------------------------------------------------------------------------- main
def environment(run: Run) -> dict:
    import torch

    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    env = {"nvidia_smi": smi.stdout.strip() if smi else None, "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "cpu_count": os.cpu_count()}
    try:
        from importlib.metadata import version

        import transformer_lens  # noqa: F401  (the import is the check)
        env["transformer_lens"] = version("transformer-lens")
    except Exception as exc:  # reported, and the parts that need it fail visibly
        env["transformer_lens"] = f"import failed: {exc}"
    return env


def dry_corpus(run: Run) -> str:
    """A small folder of text files cut from the built-in Shakespeare texts (tokenizes in a second)."""
    from meshprobe.data import open_corpus

    folder = run.work / "corpus"
    folder.mkdir(exist_ok=True)
    for i, (_, _, _, text) in enumerate(open_corpus("shakespeare", quiet=True).items()):
        (folder / f"doc{i:03d}.txt").write_text(text[:4000], encoding="utf-8")
    return str(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gpu_run.json, run.log, checkpoint tar files)")
    p.add_argument("--budget-s", type=float, default=300, help="wall-clock budget for all parts (default 300)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry)")
    p.add_argument("--dry", action="store_true", help="tiny sizes, every part in seconds (the test suite's check)")
    p.add_argument("--wheels", default=None, help="folder of wheels to install offline first")
    p.add_argument("--corpus", default=None, help="packed corpus (meshprobe data pack); dry: a Shakespeare cut")
    p.add_argument("--parts", default="smoke,throughput,zoo,bundle", help="comma list of parts to run")
    p.add_argument("--concurrency", type=int, default=None,
                   help="zoo trainings at once, with --rate: skip the calibration (numbers from an earlier run)")
    p.add_argument("--rate", type=float, default=None, help="total zoo training tokens/s at that concurrency")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget_s, args.dry, args.device)
    run.concurrency, run.rate = args.concurrency, args.rate
    if args.wheels:
        install_wheels(run, Path(args.wheels))
    else:
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run.record("environment", environment(run))
    corpus = str(Path(args.corpus).resolve()) if args.corpus else dry_corpus(run)
    parts = args.parts.split(",")
    zoo_info = None
    for part in parts:
        run.say(f"part {part} ({run.left():.0f} s left)")
        try:
            if part == "smoke":
                smoke(run, corpus)
            elif part == "throughput":
                throughput(run)
            elif part == "zoo":
                zoo_info = zoo(run, corpus)
            elif part == "bundle" and zoo_info:
                bundle(run, zoo_info)
        except Exception as exc:  # record and go on to the next part
            import traceback

            run.log.write(traceback.format_exc())
            run.record(part, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]})
    run.say(f"done ({run.left():.0f} s of the budget left)")
    return 0


def worker_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    for flag in ("--corpus", "--work", "--report", "--spec", "--zoo-out", "--runs"):
        p.add_argument(flag)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry", action="store_true")
    args = p.parse_args(argv)
    return worker_smoke(args) if args.mode == "_smoke" else worker_zoo(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main())
