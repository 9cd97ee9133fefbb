"""Trajectories of the loop state, also past the trained K: does the loop contract, cycle or drift?

`run(model, tokens, steps)` runs the loop `steps` times from the model's own h^(0) and returns the states and
the answer read after each step; `trajectory(...)` adds, per step t: the relative update
||h^(t+1) - h^(t)|| / ||h^(t)||, sigma_1 and rho of the step's Jacobian (:func:`spectrum`), the distance to
the last state, the answer lens' agreement with the trained output and with the last step's, and per sequence
a period-p cycle test and a label: contracting, cycling or drifting. Norms are per sequence over its [seq, d]
state (the space the Jacobian acts on), then averaged over sequences.

The answer read after step t ("answer lens"): for meshprobe models the coda lens (the coda, final LayerNorm
and unembedding on h^(t): what the model would output had it stopped after t steps); for transformers models
the spec's readout of the step's output (their coda is not run on its own).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshprobe.dynamics.maps import check_step, is_hf, loop_map, max_steps, seeded_run
from meshprobe.dynamics.spectrum import spectrum
from meshprobe.errors import UserError

CYCLE_TOL = 1e-2  # ||h^(T) - h^(T-p)|| / ||h^(T)|| below this (twice in a row): the orbit repeats with period p
SHRINK = 0.95  # step sizes shrinking faster than this per step (geometric mean of the last ratios): contracting
MAX_PERIOD = 6


@dataclass
class Run:
    """states [T+1, b, seq, d]: h^(0..T) (the state entering each step, float32, CPU); logits [T, b, seq, V]:
    the answer lens after steps 1..T; trained_loops: the model's K; gates: exit-gate logits."""

    states: torch.Tensor
    logits: torch.Tensor
    trained_loops: int
    gates: torch.Tensor | None = None  # [T, b, seq]: exit-gate logits (models with one: Ouro)


def default_steps(model) -> int:
    """4 x the trained K, or the model's limit (MeSH, comb and unshared layouts: K)."""
    limit = max_steps(model)
    return 4 * model.cfg.n_loops if limit is None else min(4 * model.cfg.n_loops, limit)


def check_steps(model, steps, name: str = "steps") -> int:
    """`steps` (default :func:`default_steps`) if `model` can run that many loop steps, else UserError naming
    the parameter `name`."""
    check_step(model, 0)
    if steps is None:
        return default_steps(model)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"{name}={steps!r} must be a positive integer")
    limit = max_steps(model)
    if limit is not None and steps > limit:
        raise UserError(f"{name}={steps}: this {model.cfg.variant} model has parameters for its {limit} loop steps "
                        "only")
    return steps


@contextmanager
def deeper(model, steps: int):
    """A transformers model wrapped to run `steps` loop steps (test-time depth); the original step count is
    restored on exit. meshprobe models are returned as they are (their maps run past K on their own)."""
    if not is_hf(model) or steps == model.cfg.n_loops:
        yield model
        return
    from meshprobe.hf.hooked import set_loops, wrap
    from meshprobe.hf.spec import BUILTIN_ARCHITECTURES, builtin_spec

    spec = model.spec
    if spec.architecture in BUILTIN_ARCHITECTURES:
        spec = builtin_spec(spec.architecture, model.hf.config, steps)  # some specs depend on the step count
    wrapped = wrap(model.hf, spec, loops=steps)
    try:
        yield wrapped
    finally:
        wrapped.remove_loop_hooks()
        set_loops(model.hf, model.spec, model.cfg.n_loops)


@torch.no_grad()
def _answer(model, h: torch.Tensor) -> torch.Tensor:
    return model.readout(h).float() if is_hf(model) else model.readout(h, through_coda=True).float()


@torch.no_grad()
def run(model, tokens: torch.Tensor, steps: int | None = None) -> Run:
    """The loop run `steps` times (default: :func:`default_steps`) from the model's own h^(0) (docstring)."""
    steps = check_steps(model, steps)
    if is_hf(model):
        with deeper(model, steps + 1) as m:  # one step more: h^(T) is the state entering step T
            names = [f"loop.{t}.hook_state_in" for t in range(steps + 1)]
            names += [f"loop.{t}.hook_state_out" for t in range(steps)]
            gated = "hook_exit_logit" in m.spec.extras
            names += [f"loop.{t}.hook_exit_logit" for t in range(steps)] if gated else []
            cache = {}
            seeded_run(m, tokens, [(n, lambda v, hook: cache.setdefault(hook.name, v.detach())) for n in names])
            states = torch.stack([cache[f"loop.{t}.hook_state_in"].float().cpu() for t in range(steps + 1)])
            logits = torch.stack([_answer(m, cache[f"loop.{t}.hook_state_out"]).cpu() for t in range(steps)])
            gates = torch.stack([cache[f"loop.{t}.hook_exit_logit"].float().cpu().reshape(states.shape[1:3])
                                 for t in range(steps)]) if gated else None
        return Run(states, logits, model.cfg.n_loops, gates)
    h = loop_map(model, tokens, 0).h_t
    states, logits, step = [h], [], None
    for t in range(steps):
        if step is None or t < model.cfg.n_loops:  # past K the map is the same function (maps.py)
            step = loop_map(model, tokens, t)
        h = step(h)
        states.append(h)
        logits.append(_answer(model, h))
    return Run(torch.stack(states).float().cpu(), torch.stack(logits).cpu(), model.cfg.n_loops)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Per-sequence norms over [seq, d]: x [..., b, seq, d] -> [..., b]."""
    return x.double().flatten(-2).norm(dim=-1)


def cycles(states: torch.Tensor, tol: float = CYCLE_TOL, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Per sequence, the smallest period p (1 = a fixed point) with ||h^(T) - h^(T-p)|| and ||h^(T-p) -
    h^(T-2p)|| both below tol x ||h^(T)||, or 0 when none up to max_period (and 2p <= T) repeats."""
    T = states.shape[0] - 1
    last = _norms(states[-1]).clamp_min(1e-30)
    period = torch.zeros(states.shape[1], dtype=torch.long)
    for p in range(max_period, 0, -1):  # downwards, so the smallest period found wins
        if 2 * p > T:
            continue
        a = _norms(states[T] - states[T - p]) / last
        b = _norms(states[T - p] - states[T - 2 * p]) / last
        period = torch.where((a < tol) & (b < tol), torch.full_like(period, p), period)
    return period


def classify(states: torch.Tensor, tol: float = CYCLE_TOL, shrink: float = SHRINK) -> tuple[list[str], dict]:
    """Per sequence: "contracting" (a fixed point reached, or step sizes shrinking geometrically faster than
    `shrink` per step over the last 4 steps), "cycling" (a period p >= 2 repeats: :func:`cycles`) or "drifting"
    (neither); and the per-sequence numbers behind it ({"period", "shrink_rate"})."""
    period = cycles(states, tol)
    sizes = _norms(states[1:] - states[:-1]).clamp_min(1e-30)  # [T, b]
    w = min(4, sizes.shape[0] - 1)
    rate = (sizes[-1] / sizes[-1 - w]) ** (1.0 / w) if w > 0 else torch.ones(sizes.shape[1], dtype=torch.float64)
    labels = []
    for p, r in zip(period.tolist(), rate.tolist()):
        labels.append("contracting" if p == 1 or (p == 0 and r < shrink) else "cycling" if p > 1 else "drifting")
    return labels, {"period": period.tolist(), "shrink_rate": rate.tolist()}


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, in nats."""
    lp, lq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def answer_stats(logits: torch.Tensor, trained: int, targets: torch.Tensor | None = None) -> dict:
    """Per step t = 1..T: argmax agreement with the trained output (step K) and with the last step, KL to the
    trained output, and (with targets [b, seq], -100 = none) accuracy and cross-entropy."""
    ref, last = logits[trained - 1], logits[-1]
    out = {"agree_trained": [], "agree_last": [], "kl_trained": [], "accuracy": [], "loss": []}
    mask = None if targets is None else targets >= 0
    for lg in logits:
        out["agree_trained"].append(float((lg.argmax(-1) == ref.argmax(-1)).double().mean()))
        out["agree_last"].append(float((lg.argmax(-1) == last.argmax(-1)).double().mean()))
        out["kl_trained"].append(float(_kl(ref, lg).mean()))
        if mask is not None and mask.any():
            out["accuracy"].append(float((lg.argmax(-1) == targets)[mask].double().mean()))
            out["loss"].append(float(F.cross_entropy(lg[mask].double(), targets[mask])))
    if mask is None or not mask.any():
        del out["accuracy"], out["loss"]
    return out


def directions(h: torch.Tensor) -> torch.Tensor:
    """Each position's state scaled to unit norm (what a LayerNorm readout sees, up to centring)."""
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def direction_map(step, h: torch.Tensor):
    """(g, u): the step on directions, g(u) = direction of step(r u) with r = each position's norm in h fixed,
    and u = the directions of h. Its Jacobian at u says whether directions contract even where norms grow."""
    r = h.norm(dim=-1, keepdim=True).clamp_min(1e-30).detach()
    return (lambda u: directions(step(u * r))), h / r


def _spectra(model, tokens, states, k, iters, seed, every: int = 1) -> dict:
    """sigma_1 and rho per step t = 0..T-1 of the step and of its direction map (every `every`-th step; None
    between), mean over sequences."""
    out = {key: [] for key in ("sigma1", "rho", "sigma1_dir", "rho_dir")}
    with deeper(model, states.shape[0]) as m:
        for t in range(states.shape[0] - 1):
            if t % every:
                for v in out.values():
                    v.append(None)
                continue
            step, h = loop_map(m, tokens, t), states[t].to(tokens.device)
            for suffix, (fn, at) in (("", (step, h)), ("_dir", direction_map(step, h))):
                s = spectrum(fn, at, k=k, iters=iters, seed=seed)
                out["sigma1" + suffix].append(float(s.sigma[:, 0].mean()))
                out["rho" + suffix].append(float(s.rho.mean()))
    return out


def _majority(labels: list[str]) -> str:
    """The label of more than half the sequences, else "mixed"."""
    top = max(("contracting", "cycling", "drifting"), key=labels.count)
    return top if 2 * labels.count(top) > len(labels) else "mixed"


def _orbit(states: torch.Tensor, suffix: str) -> dict:
    """Per-step update, distance to the last state and the labels of a state sequence [T+1, b, seq, d]."""
    sizes = _norms(states[1:] - states[:-1])
    norms = _norms(states).clamp_min(1e-30)
    labels, why = classify(states)
    out = {"rel_update": (sizes / norms[:-1]).mean(-1).tolist(),
           "dist_to_last": (_norms(states - states[-1]) / norms[-1]).mean(-1).tolist(),
           "labels": labels, **why, "label": _majority(labels)}
    return {key + suffix: value for key, value in out.items()}


def trajectory(model, tokens: torch.Tensor, steps: int | None = None, k: int = 4, iters: int = 32,
               seed: int = 0, targets: torch.Tensor | None = None, spectra: bool = True, every: int = 1) -> dict:
    """The trajectory of `tokens` [b, seq] through `steps` loop steps (default 4 x K or the model's limit), as
    a JSON-ready dict of per-step lists (module docstring); `spectra=False` skips the Jacobians (the costly
    part: ~3 x iters backward-sized products per step), `every` computes them every n-th step only."""
    return describe(model, tokens, run(model, tokens, steps), k, iters, seed, targets, spectra, every)


def describe(model, tokens: torch.Tensor, r: Run, k: int = 4, iters: int = 32, seed: int = 0,
             targets: torch.Tensor | None = None, spectra: bool = True, every: int = 1) -> dict:
    """:func:`trajectory` of an existing :class:`Run` of `tokens`."""
    states = r.states
    out = {"steps": states.shape[0] - 1, "trained_loops": r.trained_loops, "n_sequences": states.shape[1],
           "step_size": _norms(states[1:] - states[:-1]).mean(-1).tolist(),
           "state_norm": _norms(states).mean(-1).tolist(),
           **_orbit(states, ""), **_orbit(directions(states), "_dir"),
           "answer": answer_stats(r.logits, min(r.trained_loops, r.logits.shape[0]), targets)}
    if spectra:
        out.update(_spectra(model, tokens, states, k, iters, seed, every))
    return out
