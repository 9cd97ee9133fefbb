"""Planted data: activations [N, S, d] built from features whose directions, births, deaths, rotations across
sources and source scales are known, to check that a crosscoder finds them (tests, benchmark, notebook).

Feature j lives in sources birth_j .. death_j (inclusive). In source s its direction is u_j rotated towards a
second direction v_j by an angle that grows with s (``rotation`` radians per source: the same feature, written
a little differently at every loop step), times a magnitude (``weak``: one source of the span at a small
magnitude, the case where the L1 crosscoder's shrinkage drops it). A row has each feature on with probability
``active / n_true`` at a shared amplitude; source s is then multiplied by ``scales[s]``, and noise added.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Planted", "planted_features"]


@dataclass
class Planted:
    acts: torch.Tensor        # [N, S, d]
    directions: torch.Tensor  # [n_true, S, d]: feature j's write into source s (scaled; 0 outside its span)
    births: torch.Tensor      # [n_true] first source of each feature's span
    deaths: torch.Tensor      # [n_true] last source of the span (inclusive)
    codes: torch.Tensor       # [N, n_true] the amplitudes
    scales: torch.Tensor      # [S]


def _spans(n_true: int, S: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every kind of lifetime: a quarter persistent (all sources), a quarter at one source, the rest random
    spans."""
    births, deaths = torch.empty(n_true, dtype=torch.long), torch.empty(n_true, dtype=torch.long)
    for j in range(n_true):
        kind = j % 4
        if kind == 0:
            b, e = 0, S - 1
        elif kind == 1:
            b = int(torch.randint(0, S, (1,), generator=g))
            e = b
        else:
            b, e = sorted(int(v) for v in torch.randint(0, S, (2,), generator=g))
        births[j], deaths[j] = b, e
    return births, deaths


def planted_features(n_rows: int = 8192, n_sources: int = 5, d: int = 32, n_true: int = 40, active: float = 4.0,
                     rotation: float = 0.25, scales=None, weak: float | None = None, noise: float = 0.01,
                     seed: int = 0) -> Planted:
    """Planted activations (see the module docstring). ``scales``: per-source factors (default 1, 4, 0.25,
    ... cycling, so sources differ by up to 16x). ``weak``: the magnitude of each feature in the source after
    its birth (for features living >= 2 sources), the rest of the span at 1."""
    g = torch.Generator().manual_seed(seed)
    S = n_sources
    births, deaths = _spans(n_true, S, g)
    u = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=-1)
    v = torch.randn(n_true, d, generator=g)
    v = torch.nn.functional.normalize(v - (v * u).sum(-1, keepdim=True) * u, dim=-1)
    steps = torch.arange(S, dtype=torch.float32)
    angle = rotation * (steps[None, :] - births[:, None].float())  # [n_true, S]
    dirs = torch.cos(angle)[..., None] * u[:, None] + torch.sin(angle)[..., None] * v[:, None]
    alive = (steps[None, :] >= births[:, None]) & (steps[None, :] <= deaths[:, None])
    magnitude = alive.float()
    if weak is not None:
        has_two = deaths > births
        magnitude[has_two, births[has_two] + 1] = weak
    if scales is None:
        scales = torch.tensor([(1.0, 4.0, 0.25)[s % 3] for s in range(S)])
    scales = torch.as_tensor(scales, dtype=torch.float32)
    directions = dirs * magnitude[..., None] * scales[None, :, None]
    on = torch.rand(n_rows, n_true, generator=g) < active / n_true
    codes = on * (0.5 + torch.rand(n_rows, n_true, generator=g))
    acts = torch.einsum("nj,jsd->nsd", codes, directions)
    acts += noise * scales[None, :, None] * torch.randn(n_rows, S, d, generator=g)
    return Planted(acts, directions, births, deaths, codes, scales)


def recovery(cc, planted: Planted, min_cos: float = 0.9) -> dict:
    """How well a crosscoder found planted features: for each planted feature the learned one with the highest
    cosine of the whole decoder (every source, in the crosscoder's normalised space), and whether its
    birth..death span (:func:`~meshprobe.features.classes.lifetimes`) is the planted one. Returns
    ``{"cosine": [n_true], "match": [n_true], "span_exact": [n_true] bool, "recovered": share with cosine >=
    min_cos and the exact span}``."""
    from meshprobe.features.classes import lifetimes

    norm = torch.nn.functional.normalize
    true = norm((planted.directions * cc.scale[None, :, None]).flatten(1), dim=1)
    cos, idx = (true @ norm(cc.W_dec.detach().flatten(1), dim=1).T).max(1)
    life = lifetimes(cc.profile()[idx])
    exact = [life["birth"][j] == int(planted.births[j]) and life["death"][j] == int(planted.deaths[j])
             for j in range(len(cos))]
    good = [bool(c >= min_cos) and e for c, e in zip(cos, exact)]
    return {"cosine": cos.tolist(), "match": idx.tolist(), "span_exact": exact, "recovered": sum(good) / len(good)}
