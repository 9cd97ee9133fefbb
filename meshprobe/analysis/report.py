"""A short markdown summary of an analysis (``report.md`` beside metrics.json); numbers only, no torch."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from meshprobe._io import write_text
from meshprobe.analysis.report_dynamics import dynamics_lines

__all__ = ["render_report", "write_report"]


def _f(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _pm(mean, std, nd: int = 3) -> str:
    return f"{_f(mean, nd)} ± {_f(std, nd)}" if std is not None else _f(mean, nd)


def _models(metrics: Any) -> list[dict]:
    if isinstance(metrics, dict) and "models" in metrics:
        return list(metrics["models"])
    if isinstance(metrics, dict):
        return [metrics]
    return list(metrics)


def _consecutive(m: dict, kind: str = "rbf") -> list[tuple[str, str, float | None]]:
    """CKA between consecutive loop states h^(t), h^(t+1) (consecutive layers for vanilla models)."""
    states = m["states"]
    mat = m["cka"][kind]["mean"]
    if m["model"]["kind"] == "vanilla":
        idx = list(range(len(states)))
    else:
        idx = [i for i, s in enumerate(states) if s.startswith("h^(")]
    return [(states[a], states[b], mat[a][b]) for a, b in zip(idx, idx[1:])]


def _model_section(m: dict) -> list[str]:
    info = m["model"]
    lines = [f"## {m['name']} ({info['layout']}, {info['variant']})", ""]
    upd = ", ".join(f"{b} {_pm(mu, sd, 3)}" for b, mu, sd in zip(m["blocks"], m["update"]["mean"], m["update"]["std"]))
    lines.append(f"- **Relative update** r (mean ± std over samples): {upd}.")
    cons = _consecutive(m)
    lin = {(a, b): v for a, b, v in _consecutive(m, "linear")}
    if cons:
        txt = ", ".join(f"{a}→{b} {_f(v)} (linear {_f(lin.get((a, b)))})" for a, b, v in cons)
        lines.append(f"- **Consecutive-state CKA** (RBF, sigma = {m['cka']['sigma_frac']:g} × median distance): {txt}.")
    er = ", ".join(f"{s} {_f(v, 1)}" for s, v in zip(m["states"], m["effective_rank"]["mean"]))
    lines.append(f"- **Effective rank** (entropy effective rank, uncentered): {er}.")
    lens = m["lens"]
    direct = ", ".join(f"{s} {_f(v, 2)}" for s, v in zip(lens["states"], lens["loss"]["mean"]))
    txt = f"- **Lens** loss (nats, {lens['positions']} positions / sample): direct {direct}"
    if lens.get("coda_states") and lens["coda_loss"]["mean"] is not None:
        coda = ", ".join(f"{s} {_f(v, 2)}" for s, v in zip(lens["coda_states"], lens["coda_loss"]["mean"]))
        txt += f"; through the coda {coda}"
    lines.append(txt + f"; model loss {_f(lens['model_loss']['mean'], 3)}.")
    pr = m.get("probes")
    if pr:
        lines += _probe_lines(pr)
    r = m.get("router")
    if r:
        lines.append(_router_line(r))
    lines += dynamics_lines(m)
    for note in m.get("notes", []):
        lines.append(f"- _Note_: {note}.")
    lines.append("")
    return lines


def _ci(res: dict, field: str, ci: str, nd: int = 3) -> str:
    c = res.get(ci) or (None, None)
    return f"{_f(res.get(field), nd)} [{_f(c[0], nd)}, {_f(c[1], nd)}]"


def _probe_lines(pr: dict) -> list[str]:
    """The probe numbers of one model, each with its 95% CI and its baseline."""
    cfg = pr["config"]
    if not pr["token"]:
        return ["- **Token probes**: none (see the notes)."] + _loop_lines(pr)
    offs = sorted(cfg["offsets"])
    keys = ["0" if k == 0 else f"{k:+d}" for k in offs]
    ri = (pr.get("random_init") or {}).get("token") or {}
    lines = [f"- **Token probes** (balanced logistic, ≤ {cfg['max_classes']} classes, {cfg['n_test_seqs']} test "
             f"sequences, shared-16-gram fraction train/test {_f(cfg.get('shared_16gram_fraction'), 2)}): accuracy "
             "[95% CI] per target x[i+k]; baselines: chance 1/C, h_emb, the random-init state, and the increment "
             "ΔCE over h_emb (nats, paired CI).", "",
             "  | feature | " + " | ".join(f"k={k}" for k in keys) + " |", "  |---|" + "---|" * len(keys)]
    rows = [(f, pr["token"][f]) for f in pr["features"] if f in pr["token"]]
    rows += [(f"random init {f}", r) for f, r in ri.items()]
    for f, res in rows:
        lines.append(f"  | {f} | " + " | ".join(_ci(res[k], "accuracy", "ci") if k in res else "—" for k in keys)
                     + " |")
    first = next(iter(pr["token"].values()))
    lines.append("  | chance | " + " | ".join(_f(first[k]["chance"]) if k in first else "—" for k in keys) + " |")
    lines.append("")
    lines += ["  | R² (retrieval) | " + " | ".join(f"k={k}" for k in keys) + " |", "  |---|" + "---|" * len(keys)]
    for f, res in rows:
        lines.append(f"  | {f} | " + " | ".join(_ci(res[k], "r2", "r2_ci") if k in res else "—" for k in keys) + " |")
    lines.append("")
    inc = pr.get("increment") or {}
    if inc:
        ik = [k for k in keys if k != "0"]
        lines += ["  | ΔCE over h_emb | " + " | ".join(f"k={k}" for k in ik) + " |", "  |---|" + "---|" * len(ik)]
        for f, res in inc.items():
            lines.append(f"  | {f} | " + " | ".join(_ci(res[k], "delta_ce", "delta_ce_ci") if k in res else "—"
                                                    for k in ik) + " |")
        lines.append("")
    return lines + _loop_lines(pr)


def _loop_lines(pr: dict) -> list[str]:
    lines = []
    loop = pr.get("loop_step")
    if loop:
        bits = [f"{k} {_ci(loop[k], 'accuracy', 'ci', 2)} (null q95 {_f(loop[k]['null_q95'], 2)}, p "
                f"{_f(loop[k]['p_value'], 3)})" for k in ("state", "update", "state_unit", "update_unit",
                                                            "state_norm", "update_norm") if loop.get(k)]
        chance = next(loop[k]["chance"] for k in ("state", "update") if loop.get(k))
        lines.append(f"- **Loop-step probe** (which step t; chance 1/K = {_f(chance, 2)}; accuracy [95% CI]): "
                     + "; ".join(bits) + ".")
    return lines


def _router_line(r: dict) -> str:
    parts = []
    for i, step in enumerate(r["steps"]):
        w = r["write"]["mean"][i]
        rd = r["read"]["mean"][i]
        wi = max(range(len(w)), key=lambda j: -1 if w[j] is None else w[j])
        ri = max(range(len(rd)), key=lambda j: -1 if rd[j] is None else rd[j])
        parts.append(f"{step}: writes {r['slots'][wi]} ({_f(w[wi], 2)}), reads {r['slots'][ri]} ({_f(rd[ri], 2)}), "
                     f"entropy write {_f(r['write_entropy']['mean'][i], 2)} / read {_f(r['read_entropy']['mean'][i], 2)}"
                     f", overlap {_f(r['write_read_overlap']['mean'][i], 2)}")
    return (f"- **Routers** (max entropy log B = {_f(r['max_entropy'], 2)}): " + "; ".join(parts) + ".")


def render_report(metrics: Any, names: Sequence[str] | None = None) -> str:
    """The markdown text for a metrics.json object (or a list of ``models[]`` entries)."""
    models = _models(metrics)
    if names is not None:
        models = [dict(m, name=n) for m, n in zip(models, names)]
    lines = ["# meshprobe analyze", ""]
    if models:
        d = models[0]["data"]
        lines += [f"{d['n_samples']} samples × {d['seq_len']} tokens (seed {d['seed']}) from {d['source']}; "
                  f"every number below is in `metrics.json`.", ""]
    if len(models) > 1:
        lines += ["| model | r per block | mean consecutive-state CKA (RBF) | eff. rank of the last loop state | model loss |",
                  "|---|---|---|---|---|"]
        for m in models:
            cons = [v for _, _, v in _consecutive(m) if v is not None]
            mean_cons = sum(cons) / len(cons) if cons else None
            states = m["states"]
            last = max((i for i, s in enumerate(states) if s.startswith("h^(")), default=len(states) - 1)
            lines.append(f"| {m['name']} | {' / '.join(_f(v, 2) for v in m['update']['mean'])} | {_f(mean_cons)} | "
                         f"{_f(m['effective_rank']['mean'][last], 1)} ({states[last]}) | "
                         f"{_f(m['lens']['model_loss']['mean'])} |")
        lines.append("")
    for m in models:
        lines += _model_section(m)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(metrics: Any, path: str | os.PathLike, names: Sequence[str] | None = None) -> Path:
    """Write :func:`render_report` to ``path`` atomically (temp file + rename)."""
    return write_text(path, render_report(metrics, names))
