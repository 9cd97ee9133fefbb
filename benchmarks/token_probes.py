"""Time the token-information and loop-step probes (meshprobe.analysis.probes.tokens / loop_probes) on a checkpoint
and print what they read.

    python benchmarks/token_probes.py                                  # checkpoints/loop3-base, 500 x 256 tokens
    python benchmarks/token_probes.py --ckpt checkpoints/loop3-mesh --seq-len 128 --offsets 0,-1

Tokens: ``--seq-len 128`` uses ``checkpoints/val_tokens.npy`` (500 x 128); any other length draws non-overlapping
windows of the checkpoint's validation text (``sample_disjoint_windows``). States: h_emb, h^(0..K), h_out (one
thread, CPU). Reported: the plan, the streaming accumulation, every probe call (logistic + retrieval), the
increment of h^(K) and h_out over h_emb, and the loop-step probe, each with its wall time.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def tokens_for(ckpt: str, n: int, seq_len: int) -> torch.Tensor:
    if seq_len == 128:
        return torch.from_numpy(np.load("checkpoints/val_tokens.npy").astype(np.int64))[:n]
    from meshprobe import data as D
    from meshprobe.analysis.pipeline.tokens import default_data_spec
    from meshprobe.analysis.stats import sample_disjoint_windows
    from meshprobe.checkpoint import read_checkpoint_config
    from meshprobe.data import load_tokenizer

    corpus = D.open_corpus(default_data_spec(read_checkpoint_config(ckpt)), quiet=True)
    ids = D.tokenize_corpus(corpus, load_tokenizer(ckpt))["val"]
    return torch.from_numpy(sample_disjoint_windows(ids, n, seq_len, seed=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/loop3-base")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--offsets", default="0,-1,-2,-4,-8,1")
    ap.add_argument("--n-perm", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from meshprobe import load_checkpoint
    from meshprobe.analysis.probes.loops import LoopStepAccumulator
    from meshprobe.analysis.probes.tokens import TokenProbePlan
    from meshprobe.hooks import states as state_dict

    model = load_checkpoint(args.ckpt)
    K = model.cfg.n_loops
    tok = tokens_for(args.ckpt, args.samples, args.seq_len)
    N, S = tok.shape
    offsets = [int(k) for k in args.offsets.split(",")]
    t = time.time()
    plan = TokenProbePlan(tok, offsets, embedding=model.embed.weight)
    print(f"{args.ckpt}: tokens {N} x {S}, d={model.cfg.d_model}, K={K}; plan {time.time() - t:.2f}s, "
          f"{len(plan.rows)} planned rows")
    loop = LoopStepAccumulator(N, S, K, seed=0)
    accs: dict = {}
    t_fwd = t_acc = 0.0
    for s in range(0, N, 16):
        ids = torch.arange(s, min(s + 16, N))
        t = time.time()
        with torch.no_grad():
            _, cache = model.run_with_cache(tok[ids])
        t_fwd += time.time() - t
        t = time.time()
        for name, f in state_dict(cache, K).items():
            accs.setdefault(name, plan.accumulator()).update(ids, f)
        loop.update(ids, [cache[f"loop.{j}.hook_state_out"] for j in range(K)],
                    [cache[f"loop.{j}.hook_core_out"] - cache[f"loop.{j}.hook_state_in"] for j in range(K)])
        t_acc += time.time() - t
    print(f"forward {t_fwd:.1f}s; accumulate {t_acc:.1f}s; per state {accs['h_emb'].nbytes() / 2**20:.1f} MiB, "
          f"loop probe {loop.nbytes() / 2**20:.1f} MiB")
    out: dict = {"probe": {}, "increment": {}}
    times = []
    for name, acc in accs.items():
        for k in offsets:
            t = time.time()
            r = acc.result(k)
            times.append(time.time() - t)
            out["probe"][f"{name} {k:+d}"] = r
            print(f"{name:6s} k={k:+d} acc {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] chance "
                  f"{r['chance']:.3f} (C={r['classes']}, {r['n_train_per_class']}/{r['n_test_per_class']} rows) "
                  f"CE gain {r['ce_gain']:.2f} | R2 {r['r2']:.3f} top1 {r['retrieval_top1']:.3f} "
                  f"top5 {r['retrieval_top5']:.3f} | {times[-1]:.2f}s", flush=True)
    print(f"token probe: {len(times)} calls, mean {np.mean(times):.2f}s, max {np.max(times):.2f}s, "
          f"total {np.sum(times):.1f}s")
    t_inc = []
    for name in (f"h^({K})", "h_out"):
        for k in offsets:
            t = time.time()
            r = accs[name].increment(accs["h_emb"], k)
            t_inc.append(time.time() - t)
            out["increment"][f"{name} {k:+d}"] = r
            print(f"increment {name} over h_emb k={k:+d}: acc {r['accuracy_base']:.3f} -> {r['accuracy_joint']:.3f}"
                  f" ({r['delta_accuracy']:+.3f} [{r['delta_accuracy_ci'][0]:+.3f}, {r['delta_accuracy_ci'][1]:+.3f}])"
                  f" delta CE {r['delta_ce']:+.3f} [{r['delta_ce_ci'][0]:+.3f}, {r['delta_ce_ci'][1]:+.3f}] nats"
                  f" | {t_inc[-1]:.2f}s (base fit cached)", flush=True)
    print(f"increment: {len(t_inc)} calls, mean {np.mean(t_inc):.2f}s")
    t = time.time()
    out["loop"] = loop.result(n_perm=args.n_perm)
    t_loop = time.time() - t
    for kind, r in out["loop"].items():
        if kind != "definition":
            print(f"loop {kind:12s} acc {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] chance "
                  f"{r['chance']:.3f} null {r['null_mean']:.3f} (q95 {r['null_q95']:.3f}) p {r['p_value']:.3f}")
    print(f"loop-step probe ({args.n_perm} permutations): {t_loop:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
