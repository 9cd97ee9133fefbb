"""Loop dynamics of the bundled zoo and task models: the numbers behind docs/dynamics.md.

    python benchmarks/dynamics_zoo.py [--out benchmarks/results/dynamics_zoo.json]

Text models (checkpoints/loop3-*): the trajectory to 4K steps (or the model's limit) on the first --sequences
validation windows of --seq tokens, with the Jacobian spectra of every step (--iters Lanczos / Arnoldi
iterations), the exit rules, and the tuned lens (fitted on 3/4 of --lens-sequences windows, scored on the rest).
Task models (checkpoints/tasks/phop2-*): for p = 1 and p = 2 hops, the task accuracy of the answer read after
every step (coda lens over the symbols), where it settles, and the exits, on --task-sequences fresh sequences
(evaluation seed 1). Writes the JSON and, beside it, the markdown tables docs/dynamics.md includes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TEXT = ["loop3-base", "loop3-residual", "loop3-anchor", "loop3-anchor_emb", "loop3-mesh"]
TASKS = ["phop2-base", "phop2-anchor", "phop2-mesh"]


def text_model(path: Path, tokens: np.ndarray, args) -> dict:
    import meshprobe as mp
    from meshprobe.dynamics.analyze import dynamics_section, lens_section

    model = mp.load_checkpoint(path)
    x = torch.from_numpy(tokens[: args.sequences, : args.seq].astype("int64"))
    start = time.perf_counter()
    dyn = dynamics_section(model, x, iters=args.iters)
    rows = torch.from_numpy(tokens[: args.lens_sequences, : args.seq].astype("int64"))
    _, lens = lens_section(model, rows, fit_steps=args.fit_steps)
    return {"variant": model.cfg.variant, "dynamics": dyn, "tuned_lens": lens,
            "seconds": time.perf_counter() - start}


def task_model(path: Path, args) -> dict:
    import meshprobe as mp
    from meshprobe.data import tasks
    from meshprobe.dynamics.analyze import task_section

    model = mp.load_checkpoint(path)
    spec = tasks.task_from_entry(model.checkpoint_config["metadata"]["task"])
    out = {"variant": model.cfg.variant, "task": spec.entry(), "hops": {}}
    for p in spec.train_hops:
        b = tasks.eval_set(spec, args.task_sequences, seed=1, hops=p)
        out["hops"][str(p)] = task_section(model, torch.from_numpy(b.tokens), torch.from_numpy(b.targets),
                                           spec.symbols)
    return out


def _r(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def text_table(res: dict, args) -> list[str]:
    lines = ["| model | T | states | directions | rho at t = 0 / K-1 / T-1 | rho on directions | sigma_1 | "
             "update of directions at K / T | KL to output at K after T steps | loss at K / T |",
             "|---|---:|---|---|---|---|---|---|---:|---|"]
    for name, r in res.items():
        tr = r["dynamics"]["trajectory"]
        T, K = tr["steps"], tr["trained_loops"]
        at = lambda v: " / ".join(_r(v[t], 2) for t in sorted({0, K - 1, T - 1}))  # noqa: E731
        lines.append(f"| {name} | {T} | {tr['label']} | {tr['label_dir']} | {at(tr['rho'])} | {at(tr['rho_dir'])} | "
                     f"{at(tr['sigma1'])} | {_r(tr['rel_update_dir'][K - 1])} / {_r(tr['rel_update_dir'][-1])} | "
                     f"{_r(tr['answer']['kl_trained'][-1])} | {_r(tr['answer']['loss'][K - 1])} / "
                     f"{_r(tr['answer']['loss'][-1])} |")
    return lines


def exit_table(res: dict) -> list[str]:
    rules = ["entropy_diff", "latent_diff", "kl", "minp_kl", "argmax_stable", "cosine", "acceleration", "oracle"]
    lines = ["| model | horizon | settles at | " + " | ".join(rules) + " |", "|---|---:|---:|" + "---|" * len(rules)]
    for name, r in res.items():
        for which, sc in r["dynamics"]["exits"].items():
            cells = [f"{100 * sc['rules'][k]['compute_saved']:.0f}% / {100 * sc['rules'][k]['answer_changed']:.1f}%"
                     for k in rules]
            lines.append(f"| {name} | {sc['horizon']} ({which.replace('_', ' ')}) | {sc['settle_mean']:.2f} | "
                         + " | ".join(cells) + " |")
    return lines


def lens_table(res: dict) -> list[str]:
    lines = ["| model | state | logit lens | coda lens | tuned lens | shared translator |", "|---|---|---:|---:|---:|---:|"]
    for name, r in res.items():
        tl = r["tuned_lens"]
        for i, s in enumerate(tl["states"]):
            kl = tl["kl"]
            lines.append(f"| {name} | {s} | {_r(kl['logit'][i])} | {_r(kl['coda'][i])} | {_r(kl['tuned'][i])} | "
                         f"{_r(kl['shared'][i])} |")
    return lines


def task_table(res: dict) -> list[str]:
    lines = ["| model | p | accuracy after step 1, 2, 3, ..., T | answer settles at step 1 / 2 / 3 (share) | "
             "mean settle step | accuracy after the last step |", "|---|---:|---|---|---:|---:|"]
    for name, r in res.items():
        for p, h in r["hops"].items():
            settle = h["settle_trained"]
            lines.append(f"| {name} | {p} | {', '.join(_r(a, 2) for a in h['accuracy'])} | "
                         f"{' / '.join(_r(settle.get(str(t)), 2) for t in (1, 2, 3))} | "
                         f"{h['settle_mean_trained']:.2f} | {_r(h['accuracy'][-1])} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--text", default=",".join(TEXT))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lens-sequences", type=int, default=32)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--task-sequences", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/dynamics_zoo.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    root = Path(args.checkpoints)
    tokens = np.load(root / "val_tokens.npy")
    text = {n: text_model(root / n, tokens, args) for n in args.text.split(",") if n}
    task = {n: task_model(root / "tasks" / n, args) for n in args.tasks.split(",") if n}
    cmd = "python benchmarks/dynamics_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": cmd.strip(), "args": vars(args), "text": text, "tasks": task}, indent=1))
    md = [f"Made by `{cmd.strip()}` ({out.name} has every number).", ""]
    if text:
        md += [f"**Trajectories** (text, {args.sequences} validation windows of {args.seq} tokens, {args.iters} "
               "Krylov iterations per spectrum):", ""] + text_table(text, args) + [""]
        md += ["**Exit rules**: compute saved / answer changed against the answer at the horizon:", ""]
        md += exit_table(text) + [""]
        md += ["**Lenses**: KL(final output || lens) in nats on held-out windows:", ""] + lens_table(text) + [""]
    if task:
        md += ["**Task models** (2-hop induction, K = 3; answers over the 8 symbols):", ""] + task_table(task) + [""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
