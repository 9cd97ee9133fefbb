"""Streaming statistics of a trained crosscoder on data: FVU per source, firing frequency, the Latent Scaling
check, the top-activating rows, and (for ground-truth tasks) which hop's latent each feature follows.

    acc = FeatureStats(cc)
    for acts, where in rows: acc.update(acts, where)      # fixed-size accumulators, whatever N
    stats = acc.result()

**Latent Scaling** (Minder et al. 2025, arXiv 2504.02922, adapted to a profile over sources): for feature f
and source s, beta[f, s] = argmin_beta sum_n |y_ns - beta c_nf u_fs|^2 with y_ns = the source's reconstruction
error plus f's own contribution (what f should explain there) and u_fs a unit direction: f's decoder direction
at s where it is present, else at the nearest source where it is. With the decoder right, beta ~ profile; a
source where the profile is ~0 but beta is not is where the dictionary dropped something the data has there
(the L1 crosscoder's *complete shrinkage*). ``artefact[f]`` flags it: beta >= ``flag`` x max profile at a
source where f is absent.
"""
from __future__ import annotations

import torch

from meshprobe.features.crosscoder import LoopCrosscoder
from meshprobe.features.classes import DEFAULT_THRESHOLD, present

__all__ = ["FeatureStats", "scaling_directions"]

FLAG = 0.3


def scaling_directions(cc: LoopCrosscoder, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """[F, S, d] unit directions u_fs of the Latent Scaling fit (normalised space)."""
    w = cc.W_dec.detach()
    on = present(cc.profile(), threshold)
    S = w.shape[1]
    dist = (torch.arange(S)[:, None] - torch.arange(S)[None, :]).abs().float()  # [s, s']
    # nearest present source per (f, s): the smallest distance among present ones (ties to the earlier one)
    cost = torch.where(on[:, None, :], dist[None], torch.full_like(dist[None], float("inf")))
    nearest = (cost + 1e-3 * torch.arange(S)).argmin(-1)  # [F, S]
    u = torch.gather(w, 1, nearest[..., None].expand_as(w))
    return torch.nn.functional.normalize(u, dim=-1)


class FeatureStats:
    """Accumulators over rows (see the module docstring); ``top`` rows per feature are kept, ``hops``: the
    number of task latents fed to :meth:`update` (0 for text)."""

    def __init__(self, cc: LoopCrosscoder, top: int = 8, hops: int = 0, symbols: int = 0):
        F, S, d = cc.W_dec.shape
        self.cc, self.top = cc, top
        self.u = scaling_directions(cc)
        self.n = 0
        self.sum_x = torch.zeros(S, d, dtype=torch.float64)
        self.sum_x2 = torch.zeros(S, dtype=torch.float64)
        self.sum_err2 = torch.zeros(S, dtype=torch.float64)
        self.fires = torch.zeros(F, dtype=torch.float64)
        self.sum_code = torch.zeros(F, dtype=torch.float64)
        self.l0 = 0.0
        self.ls_num = torch.zeros(F, S, dtype=torch.float64)
        self.ls_den = torch.zeros(F, dtype=torch.float64)
        self.top_val = torch.full((F, top), -1.0)
        self.top_where = torch.zeros(F, top, 2, dtype=torch.long)
        self.hop_mass = torch.zeros(F, hops, max(symbols, 1), dtype=torch.float64) if hops else None

    @torch.no_grad()
    def update(self, acts: torch.Tensor, where: torch.Tensor, latents: torch.Tensor | None = None) -> None:
        """acts [n, S, d] (units of the activations), where [n, 2] (sequence, position); latents [n, hops]
        (the task's hop values at each row, negative = undefined) when the stats were built with hops."""
        cc = self.cc
        x = cc.normalise(acts.float())
        codes = cc.select(cc.pre_acts(x), batch=False)
        rec = cc.decode_normalised(codes)
        err = x - rec
        self.n += x.shape[0]
        self.sum_x += x.sum(0).double()
        self.sum_x2 += x.pow(2).sum((0, 2)).double()
        self.sum_err2 += err.pow(2).sum((0, 2)).double()
        self.fires += (codes > 0).sum(0).double()
        self.sum_code += codes.sum(0).double()
        self.l0 += float((codes > 0).sum())
        # Latent Scaling: sum_n c_nf <err_ns + c_nf W_fs, u_fs> and sum_n c_nf^2
        proj_err = torch.einsum("nsd,fsd->nfs", err, self.u)
        own = (cc.W_dec.detach() * self.u).sum(-1)  # [F, S]
        c2 = codes.pow(2).sum(0)
        self.ls_num += (torch.einsum("nf,nfs->fs", codes, proj_err) + c2[:, None] * own).double()
        self.ls_den += c2.double()
        self._top(codes, where)
        if self.hop_mass is not None and latents is not None:
            self._hops(codes, latents)

    def _top(self, codes: torch.Tensor, where: torch.Tensor) -> None:
        vals = torch.cat([self.top_val, codes.T], dim=1)
        wh = torch.cat([self.top_where, where[None].expand(codes.shape[1], -1, -1)], dim=1)
        best = vals.topk(self.top, dim=1)
        self.top_val = best.values
        self.top_where = torch.gather(wh, 1, best.indices[..., None].expand(-1, -1, 2))

    def _hops(self, codes: torch.Tensor, latents: torch.Tensor) -> None:
        for j in range(self.hop_mass.shape[1]):
            lat = latents[:, j]
            ok = lat >= 0
            onehot = torch.nn.functional.one_hot(lat[ok].long(), self.hop_mass.shape[2]).double()
            self.hop_mass[:, j] += codes[ok].double().T @ onehot

    def result(self) -> dict:
        """fvu [S], fvu_total, frequency [F], mean_code [F] (over rows where it fires), l0, alive [F] bool,
        beta [F, S], artefact [F] bool, top (values [F, top], where [F, top, 2]), hop_purity [F, hops] or None."""
        n = max(self.n, 1)
        var = self.sum_x2 - self.sum_x.pow(2).sum(-1) / n
        fvu = self.sum_err2 / var.clamp_min(1e-12)
        beta = (self.ls_num / self.ls_den.clamp_min(1e-12)[:, None]).float()
        profile = self.cc.profile()
        absent = ~present(profile)
        top = profile.max(1, keepdim=True).values
        artefact = ((beta >= FLAG * top) & absent).any(1) & (self.fires > 0)
        purity = None
        if self.hop_mass is not None:
            mass = self.hop_mass
            purity = (mass.max(-1).values / mass.sum(-1).clamp_min(1e-12)).float()
        return {"fvu": fvu.float(), "fvu_total": float(self.sum_err2.sum() / var.sum().clamp_min(1e-12)),
                "frequency": (self.fires / n).float(), "mean_code": (self.sum_code / self.fires.clamp_min(1)).float(),
                "l0": self.l0 / n, "alive": self.fires > 0, "beta": beta, "artefact": artefact,
                "top_values": self.top_val, "top_where": self.top_where, "hop_purity": purity, "rows": self.n}
