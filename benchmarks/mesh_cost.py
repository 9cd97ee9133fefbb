"""Where MeSH's training cost over the base model goes: base, MeSH, MeSH with its memory read replaced by a
stand-in that keeps the routers, timed in one process, step by step, in an order that reverses at every turn.

    OMP_NUM_THREADS=1 python benchmarks/mesh_cost.py                      # the bundled shape, 40 turns
    OMP_NUM_THREADS=1 python benchmarks/mesh_cost.py --d-model 256 --turns 20

"MeSH, routers only" runs everything MeSH runs (router matmuls, softmax, hooks, the read coefficients) except the
read itself (`MeshBuffer.write_read` returns h_m, tied to the coefficients by a function whose backward hands
them zeros, so the routers' backward runs too). It is not a model, only a measurement: base -> routers only is
the routers' cost, routers only -> MeSH the read's (forward and backward). Ratios are medians of paired per-turn ratios of process CPU time
(throughput of the model / throughput of base), [interquartile range]; full training steps (forward, loss,
backward, clipping, fused AdamW) on a fixed random batch, under the allocator settings `meshprobe train` uses.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Attach(torch.autograd.Function):
    """h_m unchanged, tied to the read coefficients: their backward (and the routers') runs on zero gradients."""

    @staticmethod
    def forward(ctx, x, coef):
        ctx.coef_shape = coef.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.coef_shape)


def routers_only(self, w_write, x, w_read, hook_memory):
    """Stand-in for MeshBuffer.write_read: the coefficients as the real read makes them, but no read; h_m is
    returned as it is (Attach), so no pass over the state is added."""
    w_write, w_read = w_write.to(x.dtype), w_read.to(x.dtype)
    self.weights.append(w_write)
    return Attach.apply(x, self.coefficients(w_read))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layout", default="1+2R3+1")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--turns", type=int, default=40, help="timed steps per model")
    args = p.parse_args(argv)

    import meshprobe.mesh as M
    from meshprobe import ModelConfig, build_model
    from meshprobe.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    real_read = M.MeshBuffer.write_read
    steps = {}
    for name, variant, read in [
            ("base", "base", None), ("MeSH, routers only", "mesh", routers_only), ("MeSH", "mesh", real_read)]:
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=args.d_model, n_heads=args.heads, vocab_size=args.vocab, n_ctx=args.seq,
                          layout=args.layout, variant=variant)
        model = build_model(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
        x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

        def step(model=model, opt=opt, x=x, read=read):
            M.MeshBuffer.write_read = read or real_read
            try:
                model(x, return_type="loss").backward()
            finally:
                M.MeshBuffer.write_read = real_read
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(), step()  # warm-up
        steps[name] = step
    names = list(steps)
    seconds = {name: [] for name in names}
    for turn in range(args.turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            c0 = time.process_time()
            steps[name]()
            seconds[name].append(time.process_time() - c0)
    print(f"d_model {args.d_model}, layout {args.layout}, batch {args.batch} x seq {args.seq}, vocab {args.vocab}, "
          f"torch threads {torch.get_num_threads()}, {args.turns} turns\n")
    print("| model | median step (ms) | throughput vs base [IQR] |\n|---|---:|---:|")
    for name in names:
        ratios = sorted(b / m for m, b in zip(seconds[name], seconds["base"]))
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {1e3 * statistics.median(seconds[name]):.1f} | {med:.3f} [{q1:.3f}-{q3:.3f}] |")
    print(f"\ncommand: python benchmarks/mesh_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
