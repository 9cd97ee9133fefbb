"""One model's loop dynamics as JSON-ready sections (what `meshprobe analyze --dynamics --tuned-lens` writes).

* :func:`dynamics_section` -- the trajectory past the trained K (:mod:`.trajectory`, with Jacobian spectra)
  and the exit rules scored at the trained K (:mod:`.exits`), plus the same rules over the whole trajectory.
* :func:`lens_section` -- the tuned lens fitted on the first three quarters of the sequences (or a saved one
  given), and KL(final || lens) per state on the last quarter for the logit, coda, tuned and shared lenses.
"""
from __future__ import annotations

import torch

from meshprobe.dynamics.exits import exits, settle_steps
from meshprobe.dynamics.lens import TunedLens, fingerprint, fit_tuned_lens, lens_kl, load_lens
from meshprobe.dynamics.maps import is_hf
from meshprobe.dynamics.trajectory import answer_stats, check_steps, describe, run
from meshprobe.errors import UserError
from meshprobe.hooks import recursive_state_hooks


def check_model(model, steps: int | None = None, name: str = "steps") -> int:
    """UserError unless `model` has loop steps and can run `steps` of them (`name`: the parameter to name);
    returns the steps to run."""
    return check_steps(model, steps, name)


def dynamics_section(model, tokens: torch.Tensor, targets: torch.Tensor | None = None, steps: int | None = None,
                     k: int = 4, iters: int = 20, seed: int = 0, every: int = 1) -> dict:
    """``{"trajectory": ..., "exits": {"trained": ..., "all_steps": ...}}`` for tokens [b, seq] (targets [b, seq]
    for accuracy, -100 = none; default for text: the next tokens)."""
    steps = check_model(model, steps)
    if targets is None:
        targets = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100)
    r = run(model, tokens, steps)
    traj = describe(model, tokens, r, k=k, iters=iters, seed=seed, targets=targets.cpu(), every=every)
    K = min(r.trained_loops, steps)
    gates = r.gates
    out_exits = {"trained": exits(r.logits, r.states, horizon=K, gates=gates, targets=targets.cpu())}
    if steps > K:
        out_exits["all_steps"] = exits(r.logits, r.states, gates=gates, targets=targets.cpu())
    return {"trajectory": traj, "exits": out_exits, "spectrum": {"k": k, "iters": iters, "seed": seed}}


def task_section(model, tokens: torch.Tensor, targets: torch.Tensor, symbols: int, steps: int | None = None) -> dict:
    """Where a task answer settles: the answer after each step restricted to the first `symbols` logits (the
    task's answer space), on the positions with a target (targets [b, seq], -100 elsewhere). ``{"accuracy":
    [per step], "settle": {step: share of positions}, "settle_mean", "exits": {...}}``; exits at the trained
    K (and over all steps when more are run) with accuracy against the targets."""
    steps = check_model(model, steps)
    r = run(model, tokens, steps)
    mask = targets.cpu() >= 0
    logits = r.logits[..., :symbols]
    acc = [float((lg.argmax(-1) == targets.cpu())[mask].double().mean()) for lg in logits]
    K = min(r.trained_loops, steps)
    out = {"accuracy": acc, "trained_loops": r.trained_loops, "steps": steps, "exits": {}}
    for name, horizon in (("trained", K), ("all_steps", steps)):
        if name == "all_steps" and steps == K:
            continue
        settle = settle_steps(logits[:horizon])[mask]
        out[f"settle_{name}"] = {str(t): float((settle == t).double().mean()) for t in range(1, horizon + 1)}
        out[f"settle_mean_{name}"] = float(settle.double().mean())
        # exits on the target positions only: one "position" per target
        sel = lambda x: x[:, mask].unsqueeze(1)  # noqa: E731
        ex = exits(sel(logits), sel(r.states), horizon=horizon, targets=targets.cpu()[mask].unsqueeze(0),
                   gates=None if r.gates is None else sel(r.gates))
        out["exits"][name] = ex
    return out


@torch.no_grad()
def lens_states(model, tokens: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(state names, states [S, b, seq, d] = h^(0..K), h_out [b, seq, d], final logits [b, seq, V])."""
    named = recursive_state_hooks(model.cfg.n_loops)[1:]
    wanted = {hook for _, hook in named}
    if is_hf(model):
        from meshprobe.dynamics.maps import seeded_run

        cache = {}
        seeded_run(model, tokens, [(n, lambda v, hook: cache.setdefault(hook.name, v.detach())) for n in wanted])
    else:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    states = torch.stack([cache[hook].float() for _, hook in named[:-1]])
    h_out = cache["coda.hook_out"].float()
    return [name for name, _ in named[:-1]], states, h_out, model.readout(h_out).float()


@torch.no_grad()
def _coda_kl(model, states: torch.Tensor, final: torch.Tensor) -> list:
    """KL(final || coda lens) per state, states [S, b, seq, d] (the coda attends within each sequence)."""
    if is_hf(model):
        return [None] * states.shape[0]
    target = torch.log_softmax(final.float(), -1)
    out = []
    for h in states:
        logp = torch.log_softmax(model.readout(h, through_coda=True).float(), -1)
        out.append(float((target.exp() * (target - logp)).sum(-1).mean()))
    return out


def lens_section(model, tokens: torch.Tensor, lens=None, fit_steps: int = 100, seed: int = 0):
    """(the tuned lens, ``{"states", "kl": {"logit", "coda", "tuned", "shared"}, "fitted", "n_train",
    "n_test"}``). `lens`: a saved lens folder or TunedLens to evaluate instead of fitting one (refused when it
    was fitted on another model). The coda lens reads a state through the coda (meshprobe models only)."""
    check_model(model)
    if tokens.shape[0] < 2:
        raise UserError(f"the tuned lens needs >= 2 sequences (fit on 3/4, score on 1/4), got {tokens.shape[0]}")
    if lens is not None and not isinstance(lens, TunedLens):
        lens = load_lens(lens, model)
    names, states, h_out, final = lens_states(model, tokens)
    if lens is not None and lens.steps != names:
        raise UserError(f"lens: fitted on states {lens.steps}, this model has {names}")
    n_test = max(1, tokens.shape[0] // 4)
    n_train = tokens.shape[0] - n_test
    S, d, V = states.shape[0], states.shape[-1], final.shape[-1]
    readout = model.readout
    fitted = lens is None
    if fitted:
        lens = fit_tuned_lens(states[:, :n_train].reshape(S, -1, d), final[:n_train].reshape(-1, V),
                                       readout, h_out[:n_train].reshape(-1, d), step_names=names,
                                       model=fingerprint(model), steps=fit_steps, seed=seed)
    kl = lens_kl(lens, states[:, n_train:].reshape(S, -1, d), final[n_train:].reshape(-1, V), readout)
    kl["coda"] = _coda_kl(model, states[:, n_train:], final[n_train:])
    return lens, {"states": names, "kl": kl, "fitted": fitted, "n_train": n_train, "n_test": n_test,
                  "fit_steps": fit_steps if fitted else None}


__all__ = ["answer_stats", "check_model", "dynamics_section", "lens_section", "lens_states", "task_section"]
