"""Measure a training recipe for a synthetic ground-truth task (meshprobe.data.tasks) on CPU.

Trains small models with a plain AdamW loop -- the optimizer settings and schedule of `meshprobe train`'s
defaults (betas 0.9/0.95, weight decay 0.01 on matrices, grad clip 1.0, 1% linear warm-up, cosine to
--min-lr-frac x lr over --steps; --min-lr-frac 1 keeps the lr constant) -- and evaluates task accuracy
(argmax over the first v logits where hop_p is defined) on a fixed evaluation set at every trained hop
count (the score is the one at p = hops) every --eval-every steps. steps-to-solve = the first evaluation step
with accuracy >= --solve (default 0.95); a run stops early once accuracy reaches --stop-acc (default: off).

Run on one thread, one process at a time:
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/task_recipe.py --task task:phop:hops=2,mix=1 \
        --variants base mesh --seeds 0 1 --steps 1600 --out benchmarks/results/task_recipe.jsonl
Each finished run appends one JSON line (config, curve, steps_to_solve, final accuracy, CPU seconds) to --out;\n`--summary --out FILE` prints them as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from meshprobe import ModelConfig, build_model
from meshprobe.data import tasks


def lr_at(step: int, total: int, lr: float, warmup_frac: float = 0.01, min_frac: float = 0.1) -> float:
    warmup = math.ceil(warmup_frac * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def accuracy(model, batch: tasks.TaskBatch, symbols: int, chunk: int = 256) -> float:
    model.eval()
    correct = scored = 0
    for i in range(0, len(batch.tokens), chunk):
        logits = model(torch.as_tensor(batch.tokens[i:i + chunk]))
        c, s = tasks.task_correct(logits, batch.targets[i:i + chunk], symbols)
        correct, scored = correct + c, scored + s
    model.train()
    return correct / scored


def train_run(spec: tasks.TaskSpec, variant: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=args.d_model, n_heads=args.n_heads, vocab_size=spec.vocab_size, n_ctx=spec.n_ctx,
                      layout=args.layout if variant != "vanilla" else args.vanilla_layout, variant=variant)
    model = build_model(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    evals = {p: tasks.eval_set(spec, args.eval_n, hops=p) for p in spec.train_hops}
    curve, solved, start = [], None, time.process_time()
    for step, batch in enumerate(tasks.batches(spec, args.batch, seed=seed)):
        if step % args.eval_every == 0 or step == args.steps:
            accs = {p: accuracy(model, e, spec.symbols) for p, e in evals.items()}
            curve.append({"step": step, "acc": accs[spec.hops], "acc_by_hops": accs,
                          "cpu_s": round(time.process_time() - start, 1)})
            print(f"  {variant} seed {seed} step {step}: acc {accs} ({curve[-1]['cpu_s']} cpu s)", flush=True)
            if solved is None and accs[spec.hops] >= args.solve:
                solved = step
            if step == args.steps or (args.stop_acc and accs[spec.hops] >= args.stop_acc):
                break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, min_frac=args.min_lr_frac)
        logits = model(torch.as_tensor(batch.tokens))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), torch.as_tensor(batch.targets).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {"task": spec.entry(), "variant": variant, "layout": cfg.layout, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "seed": seed, "lr": args.lr, "min_lr_frac": args.min_lr_frac,
            "batch": args.batch, "steps": args.steps, "eval_n": args.eval_n, "solve_threshold": args.solve,
            "steps_to_solve": solved,
            "final_step": curve[-1]["step"], "final_acc": curve[-1]["acc"], "cpu_s": curve[-1]["cpu_s"],
            "curve": curve}


def summary(path: str) -> str:
    """A markdown table of the runs in a results file (one row per JSON line)."""
    rows = ["| task | variant | layout | d | lr | min_lr_frac | seed | steps | steps to >= 0.95 | final step | "
            "final acc (p=1, ...) | CPU s |", "|" + "---|" * 12]
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            t = r["task"]
            task = f"{t['name']} p={t['hops']} v={t['symbols']} n={t['seq_len']} train_hops={t['train_hops']}"
            accs = ", ".join(f"{a:.3f}" for a in r["curve"][-1]["acc_by_hops"].values())
            rows.append(f"| {task} | {r['variant']} | {r['layout']} | {r['d_model']} | {r['lr']:g} | "
                        f"{r.get('min_lr_frac', 0.1):g} | {r['seed']} | {r['steps']} | {r['steps_to_solve']} | "
                        f"{r['final_step']} | {accs} | {r['cpu_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="task:phop:hops=2,symbols=8,seq_len=32,mix=1")
    ap.add_argument("--variants", nargs="+", default=["base", "mesh"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--layout", default="1+2R3+1")
    ap.add_argument("--vanilla-layout", default="8")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr / peak lr (1.0 = constant after warm-up)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=512)
    ap.add_argument("--solve", type=float, default=0.95)
    ap.add_argument("--stop-acc", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--summary", action="store_true", help="print a markdown table of the runs in --out and exit")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.out))
        return
    torch.set_num_threads(1)
    spec = tasks.parse_task(args.task)
    for variant in args.variants:
        for seed in args.seeds:
            result = train_run(spec, variant, seed, args)
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
