"""The loop-dynamics lines of report.md (no torch): trajectory, exit rules and lenses of one ``models[]`` entry."""
from __future__ import annotations

import math


def _f(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}g}"


def _at(values: list, steps: list[int]) -> str:
    return ", ".join(f"t={t} {_f(values[t])}" for t in steps if 0 <= t < len(values))


def trajectory_lines(d: dict) -> list[str]:
    tr = d["trajectory"]
    T, K = tr["steps"], tr["trained_loops"]
    marks = sorted({0, K - 1, T - 1})
    lines = [f"- **Loop dynamics** ({T} steps from h^(0), trained K = {K}, {tr['n_sequences']} sequences): states "
             f"{tr['label']} (step-size shrink rate {_f(sum(tr['shrink_rate']) / len(tr['shrink_rate']))}), "
             f"directions {tr['label_dir']} (rate {_f(sum(tr['shrink_rate_dir']) / len(tr['shrink_rate_dir']))}"
             f"{', period ' + str(max(tr['period_dir'])) if max(tr['period_dir']) else ''}); "
             f"relative update {_at(tr['rel_update'], marks)}; of the directions {_at(tr['rel_update_dir'], marks)}."]
    if "rho" in tr:
        lines.append(f"- **Jacobian of the step** (Lanczos / Arnoldi, {d['spectrum']['iters']} iterations): rho "
                     f"{_at(tr['rho'], marks)}; sigma_1 {_at(tr['sigma1'], marks)}; on directions rho "
                     f"{_at(tr['rho_dir'], marks)}.")
    ans = tr["answer"]
    txt = (f"- **Answer past K**: agreement with the output at K after {T} steps {_f(ans['agree_trained'][-1])}, "
           f"KL to it {_f(ans['kl_trained'][-1])} nats")
    if "loss" in ans:
        txt += f"; loss at K {_f(ans['loss'][K - 1])}, after {T} steps {_f(ans['loss'][-1])}"
    return lines + [txt + "."]


def exit_lines(d: dict) -> list[str]:
    lines = []
    for name, sc in d["exits"].items():
        rows = "; ".join(f"{rule} exits at {_f(r['mean_exit'], 3)} (saves {100 * r['compute_saved']:.0f}%, answer "
                         f"changed {100 * r['answer_changed']:.1f}%, KL {_f(r['kl_lost'], 2)})"
                         for rule, r in sc["rules"].items())
        lines.append(f"- **Exit rules** ({name.replace('_', ' ')}, horizon {sc['horizon']} steps; the answer "
                     f"settles at step {_f(sc['settle_mean'])} on average): {rows}.")
    return lines


def lens_lines(tl: dict) -> list[str]:
    kl = tl["kl"]
    parts = [f"{s} logit {_f(kl['logit'][i])} / coda {_f(kl['coda'][i])} / tuned {_f(kl['tuned'][i])} / shared "
             f"{_f(kl['shared'][i])}" for i, s in enumerate(tl["states"])]
    how = "fitted" if tl["fitted"] else "loaded"
    return [f"- **Tuned lens** ({how}; KL(final || lens) in nats on {tl['n_test']} held-out sequences): "
            + "; ".join(parts) + "."]


def dynamics_lines(m: dict) -> list[str]:
    """The report lines of the ``dynamics`` and ``tuned_lens`` sections (none when absent)."""
    lines = []
    if m.get("dynamics"):
        lines += trajectory_lines(m["dynamics"]) + exit_lines(m["dynamics"])
    if m.get("tuned_lens"):
        lines += lens_lines(m["tuned_lens"])
    return lines
