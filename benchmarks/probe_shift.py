"""How far the probe numbers of two metrics.json files of the same model(s) lie apart, in units of their CIs.

    python benchmarks/probe_shift.py OLD/metrics.json NEW/metrics.json

For every probe number that comes with a 95% CI (token probes: accuracy, ce_gain, r2, retrieval_top1,
retrieval_top5; increment: delta_ce, delta_accuracy; the random-init baseline's token probes; loop-step
probe: accuracy), ``|new - old| / (hi - lo)`` with ``[lo, hi]`` the old CI. Prints the largest ratio per
family and model, and the number that reached it; exit 1 when any number moved by a full CI width or more.
"""
from __future__ import annotations

import json
import sys

#: value key -> CI key, per probe family
CI_KEYS = {"token": {"accuracy": "ci", "ce_gain": "ce_gain_ci", "r2": "r2_ci", "retrieval_top1": "retrieval_top1_ci",
                     "retrieval_top5": "retrieval_top5_ci"},
           "increment": {"delta_ce": "delta_ce_ci", "delta_accuracy": "delta_accuracy_ci"},
           "loop_step": {"accuracy": "ci"}}


def _pairs(probes: dict):
    """(family, feature, offset, key, value, ci) of every number with a CI."""
    for fam in ("token", "increment"):
        for feat, by_k in (probes.get(fam) or {}).items():
            for k, res in by_k.items():
                for key, ci in CI_KEYS[fam].items():
                    if key in res and res.get(ci):
                        yield fam, feat, k, key, res[key], res[ci]
    for feat, by_k in ((probes.get("random_init") or {}).get("token") or {}).items():
        for k, res in by_k.items():
            for key, ci in CI_KEYS["token"].items():
                if key in res and res.get(ci):
                    yield "random_init", feat, k, key, res[key], res[ci]
    for kind, res in (probes.get("loop_step") or {}).items():
        if isinstance(res, dict) and res.get("ci"):
            yield "loop_step", kind, "", "accuracy", res["accuracy"], res["ci"]


def shifts(old: dict, new: dict) -> dict:
    """{(model, family): (largest ratio, where)} over the models both files hold."""
    out = {}
    new_models = {m["name"]: m for m in new["models"]}
    for m in old["models"]:
        n = new_models.get(m["name"])
        if n is None or not m.get("probes") or not n.get("probes"):
            continue
        after = {p[:4]: p[4] for p in _pairs(n["probes"])}
        for fam, feat, k, key, value, (lo, hi) in _pairs(m["probes"]):
            if (fam, feat, k, key) not in after or hi - lo <= 0:
                continue
            r = abs(after[(fam, feat, k, key)] - value) / (hi - lo)
            best = out.get((m["name"], fam), (-1.0, ""))
            if r > best[0]:
                out[(m["name"], fam)] = (r, f"{feat} k={k} {key}: {value:.4f} -> {after[(fam, feat, k, key)]:.4f} "
                                            f"(CI {lo:.4f} .. {hi:.4f})")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    old, new = (json.load(open(p)) for p in argv)
    res = shifts(old, new)
    print("| model | probe | largest shift / CI width | where |\n|---|---|---|---|")
    for (model, fam), (r, where) in sorted(res.items()):
        print(f"| {model} | {fam} | {r:.2g} | {where} |")
    return int(any(r >= 1 for r, _ in res.values()))


if __name__ == "__main__":
    sys.exit(main())
