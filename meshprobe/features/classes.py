"""What a feature's profile says: where it is born, where it dies, its lifetime class, and the summary shares.

A feature is *present* in a source when its profile there is at least ``threshold`` (default 0.2) of its
largest value over all sources. Over the loop states h^(0..K) (in order):

* birth = the first loop state where it is present, death = the last one (inclusive; None when it is in no
  loop state);
* **persistent**: present in every loop state; **step-specific**: in exactly one; **transient**: in more than
  one but not all (a span, possibly with gaps); **slot-only**: in no loop state but in a MeSH memory slot;
  **other**: only in h_emb / h_out; **dead**: never fired on the data.

Without kinds every source counts as a loop state (planted data, tests).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CLASSES", "lifetimes", "class_shares", "summary"]

CLASSES = ("persistent", "step-specific", "transient", "slot-only", "other", "dead")
DEFAULT_THRESHOLD = 0.2


def present(profile: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """[F, S] bool: profile at least ``threshold`` of the feature's largest value."""
    top = profile.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return profile >= threshold * top


def lifetimes(profile: torch.Tensor, kinds: Sequence[str] | None = None, threshold: float = DEFAULT_THRESHOLD,
              alive: torch.Tensor | None = None) -> dict[str, list]:
    """``{"birth": [F] loop-state index or None, "death": [...], "class": [F] one of CLASSES}`` from a profile
    [F, S]; ``kinds[s]`` in "loop" / "emb" / "out" / "slot" (default all "loop"); ``alive`` [F] bool marks the
    features that fired (the others are "dead")."""
    profile = torch.as_tensor(profile).float()
    F, S = profile.shape
    kinds = list(kinds or ["loop"] * S)
    loop = torch.tensor([k == "loop" for k in kinds])
    slot = torch.tensor([k == "slot" for k in kinds])
    on = present(profile, threshold)
    births, deaths, classes = [], [], []
    for f in range(F):
        steps = on[f, loop].nonzero().flatten().tolist()
        births.append(steps[0] if steps else None)
        deaths.append(steps[-1] if steps else None)
        if alive is not None and not bool(alive[f]):
            classes.append("dead")
        elif len(steps) == int(loop.sum()) and len(steps) > 1:
            classes.append("persistent")
        elif len(steps) == 1:
            classes.append("step-specific")
        elif steps:
            classes.append("transient")
        else:
            classes.append("slot-only" if bool(on[f, slot].any()) else "other")
    return {"birth": births, "death": deaths, "class": classes}


def class_shares(classes: Sequence[str]) -> dict[str, float]:
    """Share of each lifetime class among the live features (dead: share of all features)."""
    n_all = max(1, len(classes))
    live = [c for c in classes if c != "dead"]
    n = max(1, len(live))
    shares = {c: sum(x == c for x in live) / n for c in CLASSES if c != "dead"}
    shares["dead"] = (len(classes) - len(live)) / n_all
    return shares


def summary(profile: torch.Tensor, kinds: Sequence[str], life: dict[str, list],
            threshold: float = DEFAULT_THRESHOLD) -> dict[str, float | None]:
    """The numbers that answer the paper: shares of step-specific and persistent features (undifferentiated
    computation: most features persistent, flat profiles), profile flatness, and under MeSH where long-lived
    features live (information overload: do they move from the state into the slots?)."""
    profile = torch.as_tensor(profile).float()
    kinds = list(kinds)
    live = [f for f, c in enumerate(life["class"]) if c != "dead"]
    shares = class_shares(life["class"])
    loop = [s for s, k in enumerate(kinds) if k == "loop"]
    out = {"step_specific_share": shares["step-specific"], "persistent_share": shares["persistent"],
           "transient_share": shares["transient"], "slot_only_share": shares["slot-only"],
           "dead_share": shares["dead"], "flatness": None, "slot_share": None, "persistent_in_slots": None,
           "slot_mass": None}
    if live and len(loop) > 1:  # min / max of the loop-state profile: 1 = flat, 0 = absent somewhere
        p = profile[live][:, loop]
        out["flatness"] = float((p.min(1).values / p.max(1).values.clamp_min(1e-12)).mean())
    slots = [s for s, k in enumerate(kinds) if k == "slot"]
    if slots and live:
        on = present(profile[live], threshold)
        in_slot = on[:, slots].any(1)
        persistent = torch.tensor([life["class"][f] == "persistent" for f in live])
        long_lived = torch.tensor([life["class"][f] in ("persistent", "slot-only") for f in live])
        mass = profile[live].pow(2)
        out["slot_share"] = float(in_slot.float().mean())
        out["persistent_in_slots"] = float(in_slot[persistent].float().mean()) if bool(persistent.any()) else None
        out["slot_mass"] = float((mass[:, slots].sum(1) / mass.sum(1).clamp_min(1e-12)).mean())
        out["long_lived_slot_mass"] = (float((mass[long_lived][:, slots].sum(1) / mass[long_lived].sum(1)
                                              .clamp_min(1e-12)).mean()) if bool(long_lived.any()) else None)
    return out
