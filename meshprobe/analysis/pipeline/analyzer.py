"""The streaming analysis of one model: :class:`Analyzer` folds batches of cached states into fixed-size
accumulators (the paper's diagnostics, the lens, the probes, the MeSH routers) and turns them into the
per-model metrics dict. What is computed, and every choice the paper leaves open, is in the docstring of
:mod:`meshprobe.analysis.pipeline.analyze`.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterable, Mapping

import torch

from meshprobe.analysis import metrics as M
from meshprobe.analysis.pipeline.collect import StateSpec, state_spec
from meshprobe.analysis.probes.suite import ProbeSuite
from meshprobe.analysis.pipeline.schema import to_jsonable
from meshprobe.errors import UserError
from meshprobe.evaluate import token_loss
from meshprobe.runtime import torch_threads

__all__ = ["Analyzer"]


def _ms(rs: M.RunningStats | None) -> dict[str, Any]:
    if rs is None or rs.n == 0:
        return {"mean": None, "std": None}
    return {"mean": rs.mean, "std": rs.std}


def _entropy(w: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dim of probability vectors, with 0 log 0 = 0."""
    w = w.double()
    return -(w * torch.log(torch.where(w > 0, w, torch.ones_like(w)))).sum(-1)


def _effective_rank_from_normalized(r: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank from normalized singular values sigma_i / sigma_0 (NaN entries ignored).

    Identical to ``metrics.effective_rank`` (p_i = sigma_i / sum sigma_j is scale-free); saves a second SVD."""
    r = torch.nan_to_num(r.double(), nan=0.0)
    tot = r.sum(-1, keepdim=True)
    p = r / torch.where(tot > 0, tot, torch.ones_like(tot))
    er = torch.exp(-(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1))
    return torch.where(tot.squeeze(-1) > 0, er, torch.full_like(er, float("nan")))


def _lens_positions(n: int, k: int | None) -> torch.Tensor:
    """The positions decoded by the lens: all of 0..n-2 (each predicts the next token), or ``k`` of them
    evenly spaced (first and last included) when ``k < n - 1``."""
    if k is None or k >= n - 1:
        return torch.arange(n - 1)
    return torch.linspace(0, n - 2, max(int(k), 1)).round().long().unique()


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per sample: logits [b, P, V], target [b, P] -> [b] (float64)."""
    b, p, _ = logits.shape
    return token_loss(logits, target, reduction="none").view(b, p).double().mean(1)


# ---------------------------------------------------------------------------------------------------------
# the streaming analysis
# ---------------------------------------------------------------------------------------------------------
class Analyzer:
    """Fixed-size accumulators for one model; feed it batches with :meth:`update`, then call :meth:`result`.

    ``probe_suite``: the probes (:class:`~meshprobe.analysis.probes.suite.ProbeSuite`, built from the whole
    token sample by :func:`~meshprobe.analysis.pipeline.analyze.analyze_model`; ``None`` = no probes). Batches may come in
    any order.
    """

    def __init__(self, model, n_samples: int, *, probe_suite: ProbeSuite | None = None, seed: int = 0,
                 sigma_frac: float = 0.5, top: int = 50, lens_positions: int | None = 64,
                 small_op_threads: int | None = 1):
        if n_samples < 2:
            raise UserError(f"need at least 2 samples, got {n_samples}")
        self.model = model
        self.spec: StateSpec = state_spec(model)
        self.n_samples = int(n_samples)
        self.seed, self.sigma_frac, self.top = int(seed), float(sigma_frac), int(top)
        self.small_op_threads = small_op_threads
        self.lens_positions = lens_positions
        self._n_lens_positions = 0
        self.stats: dict[str, M.RunningStats] = {}
        self.suite = probe_suite
        self.n_seen = 0
        self.timing: dict[str, float] = {}  # phase -> seconds (metrics.json "timing", TIMING_PHASES)
        self._last = time.perf_counter()  # end of the last update: the forward runs between updates

    @contextmanager
    def _timed(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timing[phase] = self.timing.get(phase, 0.0) + time.perf_counter() - t

    # -- accumulators --------------------------------------------------------------------------------------
    def _rs(self, key: str) -> M.RunningStats:
        rs = self.stats.get(key)
        if rs is None:
            rs = self.stats[key] = M.RunningStats()
        return rs

    @property
    def nbytes(self) -> int:
        """Bytes held by all accumulators (independent of the number of samples fed)."""
        total = sum(rs.nbytes for rs in self.stats.values())
        if self.suite is not None:
            total += self.suite.nbytes()
        return total

    # -- one batch -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, seq_ids: Iterable[int], tok: torch.Tensor, cache: Mapping[str, torch.Tensor],
               logits: torch.Tensor) -> None:
        """Fold one batch in: ``tok`` [b, seq] (the batch's tokens), ``cache`` {hook: tensor} with every hook of
        ``spec.hook_names()``, ``logits`` [b, seq, vocab] of the forward, ``seq_ids`` the global ids."""
        self.timing["forward"] = self.timing.get("forward", 0.0) + time.perf_counter() - self._last
        spec = self.spec
        seq_ids = list(seq_ids)
        with self._timed("lens"):  # lens first (large matmuls, all threads)
            self._lens(tok, cache, logits)
        small = torch_threads(self.small_op_threads) if tok.device.type == "cpu" else nullcontext()
        with small:
            self._diagnostics(cache)
            if spec.is_mesh:
                with self._timed("router"):
                    self._router(cache)
            if self.suite is not None:
                with self._timed("probe_features"):
                    self.suite.update(seq_ids, cache)
        self.n_seen += tok.shape[0]
        self._last = time.perf_counter()

    def _lens(self, tok: torch.Tensor, cache: Mapping[str, torch.Tensor], logits: torch.Tensor) -> None:
        """4. the lens, at the lens positions only."""
        spec, model = self.spec, self.model
        pos = _lens_positions(tok.shape[1], self.lens_positions).to(tok.device)
        self._n_lens_positions = int(pos.numel())
        target = tok[:, pos + 1]
        self._rs("model_loss").update_batch(_ce(logits[:, pos], target))
        lens = [_ce(model.readout(cache[h][:, pos]), target) for _, h in spec.states]
        self._rs("lens").update_batch(torch.stack(lens, dim=1))
        if spec.lens_coda:
            hook = dict(spec.states)
            lc = [_ce(model.readout(model.run_coda(cache[hook[s]])[:, pos]), target) for s in spec.lens_coda]
            self._rs("lens_coda").update_batch(torch.stack(lc, dim=1))

    def _diagnostics(self, cache: Mapping[str, torch.Tensor]) -> None:
        spec = self.spec
        with self._timed("diagnostics"):
            # 1. relative update per block -> [b, n_blocks]
            r = torch.stack([M.relative_update(cache[o], cache[i]) for _, i, o in spec.blocks], dim=1)
            self._rs("update").update_batch(r)
            X = torch.stack([cache[h] for _, h in spec.states], dim=1)  # states stacked [b, S, n, d]
        with self._timed("cka"):  # 2. CKA
            self._rs("cka_rbf").update_batch(M.cka_matrix(X, "rbf", sigma_frac=self.sigma_frac))
            self._rs("cka_linear").update_batch(M.cka_matrix(X, "linear"))
        with self._timed("diagnostics"):  # 3. spectra
            spec_all = M.singular_spectrum(X, top=None)  # [b, S, min(n, d)]
            self._rs("erank").update_batch(_effective_rank_from_normalized(spec_all))
            k = spec_all.shape[-1]
            top = spec_all[..., : self.top]
            if k < self.top:
                top = torch.cat([top, top.new_full((*top.shape[:-1], self.top - k), float("nan"))], dim=-1)
            self._rs("spectrum").update_batch(top)

    def _router(self, cache: Mapping[str, torch.Tensor]) -> None:
        steps = self.spec.mesh_steps
        ww = torch.stack([cache[f"{p}.hook_write_weights"] for _, p in steps], dim=1).double()  # [b, T, n, B]
        wr = torch.stack([cache[f"{p}.hook_read_weights"] for _, p in steps], dim=1).double()
        self._rs("router_write").update_batch(ww.mean(2))
        self._rs("router_read").update_batch(wr.mean(2))
        T = ww.shape[1]
        self._rs("router_write_entropy").update_batch(_entropy(ww).permute(0, 2, 1).reshape(-1, T))
        self._rs("router_read_entropy").update_batch(_entropy(wr).permute(0, 2, 1).reshape(-1, T))
        self._rs("router_overlap").update_batch((ww * wr).sum(-1).mean(-1))
        norms = torch.stack([cache[f"{p}.hook_memory"].norm(dim=-1).double().mean(-1) for _, p in steps], dim=1)
        self._rs("router_slot_norm").update_batch(norms)  # [b, T, B]

    # -- result ------------------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        """The per-model metrics dict (tensors converted to lists, NaN to None): see METRICS_KEYS."""
        spec, cfg, st = self.spec, self.model.cfg, self.stats
        if self.n_seen == 0:
            raise ValueError("no batches were fed")
        notes: list[str] = []
        out: dict[str, Any] = {
            "states": spec.state_names,
            "blocks": spec.block_names,
            "update": _ms(st.get("update")),
            "cka": {"rbf": _ms(st.get("cka_rbf")), "linear": _ms(st.get("cka_linear")),
                    "sigma_frac": self.sigma_frac, "estimator": "biased HSIC (Kornblith et al. 2019)"},
            "spectrum": {"top": self.top, "center": False, **_ms(st.get("spectrum"))},
            "effective_rank": {"definition": "entropy effective rank exp(-sum p_i log p_i), p_i = sigma_i / "
                                             "sum_j sigma_j, uncentered state (Roy & Vetterli 2007)",
                               **_ms(st.get("erank"))},
            "lens": {"states": spec.state_names, "positions": self._n_lens_positions, "loss": _ms(st.get("lens")), "coda_states": list(spec.lens_coda),
                     "coda_loss": _ms(st.get("lens_coda")), "model_loss": _ms(st.get("model_loss"))},
        }
        notes += list(getattr(self.model, "analysis_notes", []))  # e.g. a wrapped transformers model
        if spec.kind == "vanilla":
            notes.append("vanilla model: states are h_emb and the residual stream after each layer "
                         "(blocks.{u}.hook_resid_post); relative update per layer; no coda lens")
        # probes
        if self.suite is None:
            out["probes"] = None
            notes.append("probes skipped (--no-probes)")
        elif not self.suite.active:
            out["probes"] = None
            notes += self.suite.notes + ["probes skipped: the sample supports no probe"]
        else:
            out["probes"] = self.suite.result()
            notes += self.suite.notes
            self.timing.update(self.suite.timing)
        # router
        if spec.is_mesh:
            B = spec.n_slots
            out["router"] = {
                "steps": [s for s, _ in spec.mesh_steps], "slots": [f"m{b}" for b in range(B)],
                "write": _ms(st.get("router_write")), "read": _ms(st.get("router_read")),
                "write_entropy": _ms(st.get("router_write_entropy")),
                "read_entropy": _ms(st.get("router_read_entropy")), "max_entropy": math.log(B),
                "write_read_overlap": _ms(st.get("router_overlap")), "slot_norm": _ms(st.get("router_slot_norm")),
            }
        else:
            out["router"] = None
            notes.append(f"router analysis and memory-slot probes skipped: variant {cfg.variant!r} has no MeSH "
                         "hooks")
        if self.n_seen != self.n_samples:
            notes.append(f"only {self.n_seen} of {self.n_samples} samples were fed")
        out["notes"] = notes
        out["timing"] = {k: round(v, 3) for k, v in self.timing.items()}
        return to_jsonable(out)
