"""Training throughput (tokens/s) in one process: our vanilla model vs HF GPTNeoXForCausalLM (the Pythia
implementation) at the same shape and batch, eager and compiled; and base recursive vs MeSH at equal unrolled
depth. Prints a markdown table (and optionally writes JSON).

    # the README's H100 table
    python benchmarks/train_throughput.py --device cuda --d-model 512 --layers 6 --seq 512 --batch 32 --compile
    # CPU smoke check
    python benchmarks/train_throughput.py --device cpu --d-model 64 --layers 4 --seq 64 --batch 4 --steps 3 --warmup 1

What is timed: rounds of `--steps` full training steps (forward, next-token loss, backward, gradient clipping,
AdamW step, zero_grad) on a fixed random batch, after `--warmup` untimed steps (compilation happens there), with a
device sync at both ends of a timed unit. All models are built first and then timed interleaved, so drift or other
load hits them alike: `--repeats` rounds, and within a round the models take turns one step at a time
(`--interleave step`, the CPU default) or one whole round at a time (`--interleave round`, the CUDA default), in
an order that reverses at every turn (A B C D, D C B A, ...), so each compared pair (vanilla/HF, MeSH/base) runs
back to back. tokens/s is the median round. The ratio is the median of the per-unit paired ratios (one per step
or round: the time of the reference model over the time of the compared model in the same turn), shown with
its interquartile range (25%-75%) and the number of pairs; when the IQR straddles a target, the run cannot
decide it. `--clock cpu` (the default on a CPU device with one thread) times the ratios with the process's CPU
time instead of the wall clock: on a shared machine the wall clock also counts the time the process waits for a
core, which other processes' load decides, not the model; one thread's CPU time is its wall time on an idle
machine. tokens/s is always wall-clock; the wall-clock ratios are printed below the table and kept in the JSON.
On CPU every model runs under the glibc allocator settings that `meshprobe train` uses (`--malloc tuned`,
see meshprobe.runtime.tune_cpu_allocator: without them each step page-faults its activations in again);
`--malloc default` keeps glibc's defaults. Either way all models share the process and so the allocator.
Peak memory (CUDA) is the largest over a model's rounds and includes the weights and optimizer states
of the other, idle models.
Fused AdamW everywhere (as `meshprobe train`); bf16 autocast on CUDA, fp32 on CPU. The HF model is built with
GPTNeoXConfig(rotary_pct 0.25, use_parallel_residual True, hidden_act gelu, tie_word_embeddings False,
dropout 0, attn_implementation sdpa), the same shape as our vanilla model (4x MLP, untied embeddings).

MFU = tokens/s * FLOPs per token / peak, with FLOPs per token = 6 * N + 12 * L * d * T (the PaLM appendix B
count; attention without a causal discount), N = matmul parameters per token over the UNROLLED depth (a tied
core counts K times; routers included) plus the unembedding (the embedding lookup is free), L = unrolled depth,
T = sequence length. Peak from --peak-tflops (default 790, H100 dense bf16; none on CPU unless given).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default d_model / 64, at least 1)")
    p.add_argument("--layers", type=int, default=6, help="vanilla depth = unrolled depth of the recursive models")
    p.add_argument("--layout", default=None,
                   help="recursive layout at that unrolled depth (default P+CR2+Q with C = layers // 3, "
                        "e.g. 6 -> 1+2R2+1, 12 -> 2+4R2+2)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds of --steps per model, interleaved over the models; the median is reported")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="clock of the paired ratios: process CPU time or wall time (auto: cpu on a 1-thread CPU run)")
    p.add_argument("--interleave", choices=["auto", "step", "round"], default="auto",
                   help="turn unit of the interleaving and of the paired ratios (auto: step on CPU, round on CUDA)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--only", default="vanilla,hf,base,mesh",
                   help="comma list of models to run: vanilla, hf, base, mesh")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default 790 on CUDA = H100 dense bf16; none on CPU)")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="CPU: run every model under the glibc settings `meshprobe train` uses "
                        "(meshprobe.runtime.tune_cpu_allocator) or under glibc's defaults")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def default_layout(layers: int) -> str:
    core = max(1, layers // 3)
    rest = layers - 2 * core
    if rest < 0:
        raise SystemExit(f"--layers {layers} is too shallow for a 2-loop layout; give --layout")
    return f"{rest // 2}+{core}R2+{rest - rest // 2}"


def flops_per_token(n_matmul: int, layers: int, d: int, seq: int) -> float:
    return 6.0 * n_matmul + 12.0 * layers * d * seq


def our_model(kind: str, args, layout: str):
    from meshprobe import ModelConfig, build_model

    heads = args.heads or max(1, args.d_model // 64)
    if kind == "vanilla":
        cfg = ModelConfig(d_model=args.d_model, n_heads=heads, vocab_size=args.vocab, n_ctx=args.seq,
                          layout=str(args.layers), variant="vanilla")
    else:
        cfg = ModelConfig(d_model=args.d_model, n_heads=heads, vocab_size=args.vocab, n_ctx=args.seq,
                          layout=layout, variant=kind)
    model = build_model(cfg)
    counts = model.parameter_counts()
    n = counts["non_embedding"] + args.d_model * args.vocab  # + unembedding
    if cfg.shared and cfg.n_loops > 1:  # the tied core runs K times
        core = sum(p.numel() for p in model.core.parameters())
        n += (cfg.n_loops - 1) * core
    return model, (lambda m, x: m(x, return_type="loss")), n, cfg.unrolled_depth, cfg.layout


def hf_model(args):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    heads = args.heads or max(1, args.d_model // 64)
    cfg = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                        num_attention_heads=heads, intermediate_size=4 * args.d_model, rotary_pct=0.25,
                        rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
                        tie_word_embeddings=False, max_position_embeddings=args.seq, hidden_dropout=0.0,
                        attention_dropout=0.0, use_cache=False)
    model = GPTNeoXForCausalLM._from_config(cfg, attn_implementation="sdpa")
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_in" not in name)
    return model, (lambda m, x: m(input_ids=x, labels=x).loss), n, args.layers, str(args.layers)


class Runner:
    """One model + optimizer on the device; `warm()` runs the untimed steps, `time()` one timed round."""

    def __init__(self, model, loss_fn, args, device, precision, compiled: bool) -> None:
        import torch

        self.args, self.device = args, device
        self.model = model.to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                                     fused=True)  # as `meshprobe train` (every device)
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.loss_fn = loss_fn
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        self.bf16 = precision == "bf16"
        self.rounds: list[float] = []  # tokens/s per round
        self.units: list[float] = []  # wall seconds per timed turn
        self.cpu_units: list[float] = []  # process CPU seconds per timed turn
        self.loss = None
        self.peak_mem = 0

    def step(self):
        import torch

        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.fwd, self.x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.detach()

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.args.warmup):
            self.step()
        self.sync()
        return time.perf_counter() - t0

    def time_unit(self, n_steps: int) -> float:
        """Run n_steps timed steps; return their seconds (also appended to `units`)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_steps):
            self.step()
        self.sync()
        seconds = time.perf_counter() - t0
        self.units.append(seconds)
        self.cpu_units.append(time.process_time() - c0)
        if self.device.type == "cuda":
            self.peak_mem = max(self.peak_mem, torch.cuda.max_memory_allocated(self.device))
        return seconds


def run_interleaved(runners: list[Runner], repeats: int, steps: int, unit: str) -> None:
    """`repeats` rounds; within a round the runners take turns of one step (unit "step") or of the whole round
    (unit "round"), in an order reversed at every turn. Fills each runner's `rounds` (tokens/s) and `units`."""
    turn = 0
    for _ in range(repeats):
        seconds = [0.0] * len(runners)
        for _ in range(steps if unit == "step" else 1):
            order = list(range(len(runners)))[:: 1 if turn % 2 == 0 else -1]
            for i in order:
                seconds[i] += runners[i].time_unit(1 if unit == "step" else steps)
            turn += 1
        for runner, sec in zip(runners, seconds):
            runner.rounds.append(runner.args.batch * runner.args.seq * steps / sec)


def paired_ratio(times: list[float], ref_times: list[float], prefix: str = "ratio") -> dict:
    """Median and interquartile range of the per-turn throughput ratios (= ref time / time)."""
    ratios = sorted(r / m for m, r in zip(times, ref_times))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {prefix: statistics.median(ratios), f"{prefix}_q1": q1, f"{prefix}_q3": q3, f"{prefix}_pairs": len(ratios)}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    peak = args.peak_tflops if args.peak_tflops is not None else (790.0 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    allocator = "-"
    if device.type == "cpu":
        from meshprobe.runtime import CPU_ALLOCATOR, tune_cpu_allocator

        tuned = args.malloc == "tuned" and tune_cpu_allocator()
        allocator = ("glibc mmap threshold {} MiB, trim threshold {} MiB".format(
            CPU_ALLOCATOR["mmap_threshold"] >> 20, CPU_ALLOCATOR["trim_threshold"] >> 20) if tuned else "default")
    layout = args.layout or default_layout(args.layers)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    modes = [False, True] if args.compile else [False]
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
        only = [o for o in only if o != "hf"]

    runners, results = [], []
    for compiled in modes:
        for kind in only:
            torch.manual_seed(0)
            if kind == "hf":
                model, loss_fn, n, depth, shown = hf_model(args)
                name = "HF GPTNeoXForCausalLM"
            else:
                model, loss_fn, n, depth, shown = our_model(kind, args, layout)
                name = f"meshprobe {kind}"
            runner = Runner(model, loss_fn, args, device, precision, compiled)
            warm_s = runner.warm()
            print(f"  ready: {name} {'compiled' if compiled else 'eager'} (warm-up {warm_s:.1f} s)",
                  file=sys.stderr, flush=True)
            runners.append(runner)
            results.append(dict(model=kind, name=name, layout=shown, compiled=compiled, n_matmul_params=n,
                                unrolled_depth=depth, warmup_s=warm_s,
                                flops_per_token=flops_per_token(n, depth, args.d_model, args.seq)))
    unit = args.interleave if args.interleave != "auto" else ("round" if device.type == "cuda" else "step")
    clock = args.clock if args.clock != "auto" else (
        "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run_interleaved(runners, args.repeats, args.steps, unit)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (
        len(runners) * args.repeats * args.steps)
    for r, runner in zip(results, runners):
        r["runner"] = runner
    for runner, r in zip(runners, results):
        rounds = sorted(runner.rounds)
        r["tokens_per_s"] = rounds[len(rounds) // 2]  # median round
        r["rounds_tokens_per_s"] = runner.rounds
        r["final_loss"] = float(runner.loss)
        if device.type == "cuda":
            r["peak_mem_gb"] = runner.peak_mem / 1e9  # includes the other (idle) models' weights and states
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12) if peak else None

    def find(kind, compiled):
        return next((r for r in results if r["model"] == kind and r["compiled"] == compiled), None)

    for r in results:
        ref = {"vanilla": "hf", "mesh": "base"}.get(r["model"])
        other = find(ref, r["compiled"]) if ref else None
        r["ratio_vs"], r["ratio_clock"] = (ref, clock) if other else (None, None)
        if not other:
            r["ratio"] = None
            continue
        mine, theirs = r["runner"], other["runner"]
        r.update(paired_ratio(mine.units, theirs.units, "wall_ratio"))
        r.update(paired_ratio(mine.cpu_units, theirs.cpu_units, "cpu_ratio"))
        r.update({k.removeprefix(clock + "_"): v for k, v in r.items() if k.startswith(clock + "_ratio")})
    for r in results:
        runner = r.pop("runner")
        r["units_s"], r["cpu_units_s"] = runner.units, runner.cpu_units
    del runners
    gc.collect()

    heads = args.heads or max(1, args.d_model // 64)
    print(f"\nTraining throughput on {dev_name}, torch {torch.__version__}, transformers {hf_version}, {precision}, "
          f"d_model {args.d_model}, {heads} heads, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
          f"median of {args.repeats} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps, "
          f"turns of one {unit}; ratio = median of paired per-{unit} ratios [IQR] (pairs), {clock} clock"
          + (f"; allocator (all models): {allocator}, {faults_per_step:,.0f} page faults per step"
             if device.type == "cpu" else "") + "\n")
    print("| model | layout | mode | matmul params/token | tokens/s | ratio [IQR] (pairs) | MFU |" +
          (" peak mem |" if device.type == "cuda" else ""))
    print("|---|---|---|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    for r in results:
        vs = "HF" if r["ratio_vs"] == "hf" else r["ratio_vs"]
        ratio = (f"{r['ratio']:.3f}x vs {vs} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}] ({r['ratio_pairs']})"
                 if r["ratio"] else "")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        line = (f"| {r['name']} | {r['layout']} | {'compiled' if r['compiled'] else 'eager'} | "
                f"{r['n_matmul_params'] / 1e6:.2f} M | {r['tokens_per_s']:,.0f} | {ratio} | {mfu} |")
        if device.type == "cuda":
            line += f" {r.get('peak_mem_gb', 0):.1f} GB |"
        print(line)
    if clock != "wall":
        for r in results:
            if r["ratio"]:
                print(f"wall-clock ratio of {r['name']} {'compiled' if r['compiled'] else 'eager'}: "
                      f"{r['wall_ratio']:.3f}x [{r['wall_ratio_q1']:.3f}-{r['wall_ratio_q3']:.3f}]")
    print(f"\ncommand: python benchmarks/train_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "torch": torch.__version__, "transformers": hf_version,
                       "precision": precision, "allocator": allocator, "page_faults_per_step": faults_per_step,
                       "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
