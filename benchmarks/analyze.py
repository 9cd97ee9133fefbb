"""Time and peak memory of `analyze_model` (diagnostics + probes + lens + routers) for several sample counts.

    python benchmarks/analyze.py                       # N = 100, 500, 2000 on a tiny-shaped random MeSH model
    python benchmarks/analyze.py --ns 100,500 --variant base --no-probes
    python benchmarks/analyze.py --ckpt checkpoints/loop3-base --ns 500   # a checkpoint on its validation sample

Each N runs in a fresh Python process so the peaks do not mix. Reported per N:

* ``CPU seconds``: CPU time of the process during the analysis (on a loaded machine wall time exceeds it);
* ``seconds``: wall time of ``analyze_model`` alone (the model is built and the tokens drawn before the clock
  starts; the first batch's one-off costs are included);
* ``peak RSS delta``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the analysis minus the same value just
  before it, i.e. how far the process' resident-set peak rose during the analysis (includes the allocator's
  retained pages; tracemalloc is not used because it does not see torch's tensor memory);
* ``accumulators``: ``Analyzer.nbytes``, the bytes held by the streaming accumulators at the end;
* on CUDA also ``torch.cuda.max_memory_allocated`` during the analysis.

With ``--ckpt`` the tokens are those `meshprobe analyze` would use: the checkpoint's own ``val_tokens.npy`` when
it ships one (the bundled checkpoints: 500 x 128), else windows of its validation split (``--seq-len``, 256).

The default model is the `tiny` shape (ModelConfig defaults: d_model 128, 4 heads, vocab 8192, n_ctx 256,
layout 1+2R2+1, i.e. 6 unrolled layers) with random weights; tokens are random ids with a Zipf-like frequency
profile (so the probes see a realistic class distribution), 256 tokens each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def child(args) -> dict:
    import resource

    import torch

    from meshprobe import ModelConfig, build_model, load_checkpoint
    from meshprobe.analysis.pipeline.analyze import analyze_model
    from meshprobe.analysis.pipeline.tokens import TokenRequest, resolve_tokens

    device = torch.device(args.device)
    n = args.n
    if args.ckpt:
        model = load_checkpoint(args.ckpt, device=device)
        tokens, _ = resolve_tokens(model, args.ckpt, TokenRequest(samples=n, seq_len=args.seq_len))
    else:
        torch.manual_seed(0)
        seq_len = args.seq_len or 256
        cfg = ModelConfig(variant=args.variant, layout=args.layout, d_model=args.d_model, n_ctx=seq_len)
        model = build_model(cfg).to(device).eval()
        g = torch.Generator().manual_seed(1)
        ranks = torch.distributions.Exponential(1 / 300.0).sample((n, seq_len)).long()
        perm = torch.randperm(cfg.vocab_size, generator=g)
        tokens = perm[ranks.clamp(max=cfg.vocab_size - 1)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    res = analyze_model(model, tokens, batch_size=args.batch_size, device=device, probes=not args.no_probes,
                        baseline=not args.no_baseline, l2_mode=args.l2_mode, progress=False,
                        threads=None if args.threads == 0 else args.threads)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"n": n, "seconds": seconds, "cpu_seconds": cpu, "rss_before_mib": before / 1024, "rss_peak_mib": after / 1024,
           "rss_delta_mib": (after - before) / 1024, "accumulators_mib": res["data"]["accumulator_bytes"] / 2**20,
           "model": f"{model.cfg.layout} {model.cfg.variant} d{model.cfg.d_model}", "seq_len": tokens.shape[1]}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if args.metrics_out:
        with open(f"{args.metrics_out}.n{n}.json", "w") as fh:
            json.dump(res, fh)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="100,500,2000", help="comma-separated sample counts")
    ap.add_argument("--ckpt", default=None, help="benchmark this checkpoint on its validation text")
    ap.add_argument("--variant", default="mesh")
    ap.add_argument("--layout", default="1+2R2+1")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sequence (default 256; with --ckpt: its val_tokens.npy's width, else 256)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline of the probes")
    ap.add_argument("--l2-mode", default="per_offset", help="probe L2 selection: per_offset (default) or cv")
    ap.add_argument("--metrics-out", default=None, help="also write each N's metrics to PREFIX.n<N>.json")
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--n", str(n)]
        for flag in ("variant", "layout", "d_model", "seq_len", "batch_size", "threads", "device"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.ckpt:
            cmd += ["--ckpt", args.ckpt]
        if args.no_probes:
            cmd.append("--no-probes")
        if args.no_baseline:
            cmd.append("--no-baseline")
        cmd += ["--l2-mode", args.l2_mode] + (["--metrics-out", args.metrics_out] if args.metrics_out else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"N={n} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"N={n}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
    cuda = any("cuda_peak_mib" in r for r in rows)
    print(f"\n`analyze_model` on {rows[0]['model']}, seq_len {rows[0]['seq_len']}, batch {args.batch_size}, "
          f"probes {'off' if args.no_probes else 'on'}, baseline {'off' if args.no_baseline else 'on'}, "
          f"l2 {args.l2_mode}, load average {os.getloadavg()[0]:.2f}, device {args.device}, threads {args.threads}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    head = "| N | seconds | CPU seconds | s / sample | peak RSS delta (MiB) | peak RSS (MiB) | accumulators (MiB) |"
    print(head + (" CUDA peak (MiB) |" if cuda else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for r in rows:
        line = (f"| {r['n']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['seconds'] / r['n']:.3f} | {r['rss_delta_mib']:.0f} | "
                f"{r['rss_peak_mib']:.0f} | {r['accumulators_mib']:.1f} |")
        print(line + (f" {r['cuda_peak_mib']:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
