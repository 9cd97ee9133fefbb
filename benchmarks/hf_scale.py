"""`meshprobe analyze` at the released sizes of the published looped LMs: time and peak memory against the
model's own forward, on the same tokens, in one run.

    python benchmarks/hf_scale.py --threads 2                 # both shapes (minutes each; ~8 GB free RAM needed)
    python benchmarks/hf_scale.py --shapes ouro --threads 2
    python benchmarks/hf_scale.py --tiny --out /tmp/hf_scale.json   # toy sizes, seconds (what the test runs)
    python benchmarks/hf_scale.py --shallow --threads 2      # one layer per stage: upper bounds of the ratios

Two shapes, random weights (no hub is reachable), built from config dicts:

* ``ouro``: Ouro-1.4B's shape as a native transformers ``DoryForCausalLM`` (hidden 2048, intermediate 5632,
  16 heads of 128, 24 layers: 2 in, 20 looped x 4, 2 out, vocab 49152), float32; 16 x 128 tokens.
* ``huginn``: Huginn-3.5B's shape (hidden 5280, prelude 2, core 4, coda 2, vocab 65536) as the Huginn (Raven)
  stand-in of tests/hf_standins.py (remote code, saved with ``write_remote_raven``; its blocks are one
  ``2d -> d`` MLP each, no attention, so it has fewer parameters than the real model), bfloat16,
  ``--loops 8``; 4 x 128 tokens.

Tokens: Zipf-distributed ids (p(r) ~ 1/r over the first 2000 ids, seeded) so the token probes find repeated
target types, as in real text. Each phase runs in a fresh Python process (its peak RSS is its own, from
``getrusage(RUSAGE_SELF)``): ``build`` (random model -> a temporary directory), ``forward`` (load, then the
plain forward under ``torch.no_grad`` in batches of 8, the batch size of analyze), ``analyze`` (``meshprobe
analyze DIR --tokens ... --threads T``: every default analysis, through the CLI). Reported per shape: wall time
and peak RSS of both processes, their ratios (whole process: load included in both; and without the load:
the forward alone vs the analysis alone, ``data.seconds``), the seconds of each analysis phase (metrics.json
``timing``) and its share, and whether every token probe ran on every state.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hf_scale.json"

SHAPES = {
    "ouro": {"arch": "dory", "dtype": "float32", "samples": 16, "seq_len": 128, "loops": None,
             "config": {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
                        "n_input_layers": 2, "n_output_layers": 2, "n_recurrent_loops": 4,
                        "sliding_window": 4096, "max_position_embeddings": 4096}},
    "huginn": {"arch": "raven", "dtype": "bfloat16", "samples": 4, "seq_len": 128, "loops": 8,
               "config": {"vocab_size": 65536, "n_embd": 5280, "n_layers_in_prelude": 2,
                          "n_layers_in_recurrent_block": 4, "n_layers_in_coda": 2, "mean_recurrence": 32,
                          "block_size": 4096}},
}
TINY = {
    "ouro": {**SHAPES["ouro"], "samples": 12, "seq_len": 32,
             "config": {**SHAPES["ouro"]["config"], "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                        "n_input_layers": 1, "n_output_layers": 1, "n_recurrent_loops": 3}},
    "huginn": {**SHAPES["huginn"], "samples": 12, "seq_len": 32, "loops": 3,
               "config": {**SHAPES["huginn"]["config"], "vocab_size": 512, "n_embd": 24}},
}
#: --shallow: the same width, vocabulary, loop steps (states) and tokens with one layer per stage, so every
#: analysis costs what it costs at the released depth while the forward is several times cheaper: the ratios
#: it measures are upper bounds of the released depth's (for a machine where the full forward takes too long)
SHALLOW = {"ouro": {"num_hidden_layers": 3, "n_input_layers": 1, "n_output_layers": 1},
           "huginn": {"n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 1, "n_layers_in_coda": 1}}
ZIPF_TYPES = 2000


def _shapes(tiny: bool, shallow: bool) -> dict:
    base = TINY if tiny else SHAPES
    if not shallow:
        return base
    return {k: {**v, "config": {**v["config"], **SHALLOW[k]}} for k, v in base.items()}


def _shape(args) -> dict:
    return _shapes(args.tiny, args.shallow)[args.shape]


def _emit(doc: dict) -> None:
    print("RESULT " + json.dumps(doc), flush=True)


# -- the phases (each in its own process) ---------------------------------------------------------------------
def build(args) -> dict:
    import numpy as np
    import torch

    sh, d = _shape(args), Path(args.dir)
    dtype = getattr(torch, sh["dtype"])
    torch.manual_seed(0)
    if sh["arch"] == "dory":
        from transformers import DoryConfig, DoryForCausalLM

        model = DoryForCausalLM(DoryConfig(**sh["config"])).to(dtype)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(d)
        del model
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from hf_standins import write_remote_raven

        write_remote_raven(d, dtype=dtype, **sh["config"])
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    rng = np.random.default_rng(1)
    types = min(ZIPF_TYPES, sh["config"]["vocab_size"])
    p = 1.0 / np.arange(1, types + 1)
    tokens = rng.choice(types, size=(sh["samples"], sh["seq_len"]), p=p / p.sum()).astype(np.int64)
    np.save(d / "tokens.npy", tokens)
    return {"parameters": int(n_params)}


def forward(args) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    sh = _shape(args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype="auto", trust_remote_code=sh["arch"] == "raven",
                                                 local_files_only=True, use_safetensors=True).eval()
    t_load = time.perf_counter() - t0
    tokens = torch.from_numpy(np.load(Path(args.dir) / "tokens.npy"))
    kw = {"num_steps": sh["loops"]} if sh["loops"] is not None else {}
    t1 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(tokens), 8):
            model(input_ids=tokens[s:s + 8], use_cache=False, **kw).logits.float()
    return {"load_seconds": t_load, "forward_seconds": time.perf_counter() - t1}


def analyze(args) -> dict:
    from meshprobe.cli import main

    sh, d = _shape(args), Path(args.dir)
    out = d.parent / "analysis"
    cmd = ["analyze", str(d), "--tokens", str(d / "tokens.npy"), "--out", str(out), "--threads", str(args.threads)]
    if sh["loops"] is not None:
        cmd += ["--loops", str(sh["loops"])]
    if sh["arch"] == "raven":
        cmd += ["--trust-remote-code"]
    rc = main(cmd)
    if rc != 0:
        raise SystemExit(f"meshprobe analyze exited with {rc}")
    m = json.loads((out / "metrics.json").read_text())["models"][0]
    probes = m["probes"] or {}
    token = probes.get("token") or {}
    offsets = probes.get("config", {}).get("offsets", [])
    return {"analysis_seconds": m["data"]["seconds"], "timing": m["timing"], "states": m["states"],
            "token_probe_states": [s for s in m["states"] if len(token.get(s, {})) == len(offsets)],
            "offsets": offsets, "loop_step_probe": probes.get("loop_step") is not None,
            "retrieval_code": probes.get("config", {}).get("retrieval_code"),
            "accumulator_bytes": m["data"]["accumulator_bytes"], "notes": m["notes"]}


def child(args) -> None:
    import resource

    t0 = time.perf_counter()
    doc = {"build": build, "forward": forward, "analyze": analyze}[args.child](args)
    doc["wall_seconds"] = time.perf_counter() - t0
    doc["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _emit(doc)


# -- the parent ------------------------------------------------------------------------------------------------
def _run(phase: str, shape: str, d: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--shape", shape, "--dir", str(d),
           "--threads", str(args.threads)] + (["--tiny"] if args.tiny else []) + (["--shallow"] if args.shallow else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_MODULES_CACHE=str(d.parent / "hf-modules"))
    print(f"[{shape}] {phase} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"[{shape}] {phase} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def run_shape(shape: str, args) -> dict:
    sh = _shapes(args.tiny, args.shallow)[shape]
    tmp = Path(tempfile.mkdtemp(prefix=f"hf_scale-{shape}-", dir=args.tmp))
    try:
        d = tmp / "model"
        built = _run("build", shape, d, args)
        fwd = _run("forward", shape, d, args)
        an = _run("analyze", shape, d, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    phases = {k: v for k, v in an["timing"].items()}
    total = sum(phases.values()) or 1.0
    return {
        "shape": {k: v for k, v in sh.items() if k != "config"}, "config": sh["config"],
        "parameters": built["parameters"], "build": built, "forward": fwd, "analyze": an,
        "time_ratio": an["wall_seconds"] / fwd["wall_seconds"],
        "time_ratio_without_load": an["analysis_seconds"] / fwd["forward_seconds"],
        "peak_rss_delta_mib": an["peak_rss_mib"] - fwd["peak_rss_mib"],
        "phase_share": {k: v / total for k, v in phases.items()},
        "every_token_probe_on_every_state": an["token_probe_states"] == an["states"] and bool(an["offsets"]),
    }


def table(results: dict) -> str:
    rows = ["| shape | params | tokens | forward: wall / peak RSS | analyze: wall / peak RSS | time ratio "
            "(without load) | RSS delta | token probes |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f, a, s = r["forward"], r["analyze"], r["shape"]
        rows.append(f"| {name} ({s['dtype']}{', --loops %d' % s['loops'] if s['loops'] else ''}) | "
                    f"{r['parameters'] / 1e9:.2f} B | {s['samples']} x {s['seq_len']} | "
                    f"{f['wall_seconds']:.0f} s / {f['peak_rss_mib'] / 1024:.2f} GiB | "
                    f"{a['wall_seconds']:.0f} s / {a['peak_rss_mib'] / 1024:.2f} GiB | {r['time_ratio']:.2f}x "
                    f"({r['time_ratio_without_load']:.2f}x) | {r['peak_rss_delta_mib'] / 1024:+.2f} GiB | "
                    f"{len(a['token_probe_states'])} / {len(a['states'])} states x {len(a['offsets'])} offsets |")
    rows += ["", "| shape | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for name, r in results.items():
        t = r["analyze"]["timing"]
        rows.append(f"| {name} | " + " | ".join(f"{t[p]:.1f} s ({100 * r['phase_share'][p]:.0f}%)" if p in t else "-"
                                                for p in PHASES) + " |")
    return "\n".join(rows)


PHASES = ("forward", "lens", "diagnostics", "cka", "probe_features", "token_probes", "increment", "loop_step_probe",
          "random_init_baseline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="ouro,huginn", help="comma-separated: ouro, huginn")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the forward and of analyze")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (seconds): the test")
    ap.add_argument("--shallow", action="store_true",
                    help="one layer per stage, released width / vocabulary / loops / tokens (upper-bound ratios)")
    ap.add_argument("--out", default=None, help=f"results JSON (default {RESULTS.relative_to(ROOT)}; --tiny: none); "
                                                 "results of other shapes already in it are kept")
    ap.add_argument("--tmp", default=None, help="where the temporary model directories go (default: the system's)")
    ap.add_argument("--child", choices=("build", "forward", "analyze"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    command = "python benchmarks/hf_scale.py " + " ".join(sys.argv[1:])
    results = {}
    for s in args.shapes.split(","):
        results[s + ("-shallow" if args.shallow else "")] = {"command": command, **run_shape(s, args)}
    print(table(results))
    out = args.out or (None if args.tiny else RESULTS)
    if out:  # shapes run separately are merged into one file (each result keeps its command)
        old = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        doc = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
               "results": {**old.get("results", {}), **results}}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
