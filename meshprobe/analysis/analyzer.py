"""The streaming analysis of one model: :class:`Analyzer` folds batches of cached states into fixed-size
accumulators (the paper's diagnostics, the lens, the probes, the MeSH routers) and turns them into the
per-model metrics dict. What is computed, and every choice the paper leaves open, is in the docstring of
:mod:`meshprobe.analysis.run`.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Iterable, Mapping

import torch

from meshprobe.analysis import metrics as M
from meshprobe.analysis import probes as P
from meshprobe.analysis.collect import StateSpec, state_spec
from meshprobe.analysis.schema import to_jsonable
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

    ``n_samples`` fixes the train / test split of the probes (the last ``max(1, round(test_fraction * N))``
    sequence ids are the test set; train ids must all be fed before the first test id). ``label_map`` is the
    token-class map of the probes (built from the training sequences by :func:`analyze_model`).
    """

    def __init__(self, model, n_samples: int, *, label_map: P.TokenLabelMap | None = None, probes: bool = True,
                 seed: int = 0, sigma_frac: float = 0.5, top: int = 50, l2: float = 1e-2,
                 test_fraction: float = 0.2, max_classes: int = 256, lens_positions: int | None = 64,
                 small_op_threads: int | None = 1):
        if n_samples < 2:
            raise UserError(f"need at least 2 samples, got {n_samples}")
        self.model = model
        self.spec: StateSpec = state_spec(model)
        self.n_samples = int(n_samples)
        self.n_test = max(1, int(round(test_fraction * n_samples)))
        self.n_train = self.n_samples - self.n_test
        self.seed, self.sigma_frac, self.top, self.l2 = int(seed), float(sigma_frac), int(top), float(l2)
        self.test_fraction = float(test_fraction)
        self.max_classes = int(max_classes)
        self.small_op_threads = small_op_threads
        self.lens_positions = lens_positions
        self._n_lens_positions = 0
        self.stats: dict[str, M.RunningStats] = {}
        self.probes_on = bool(probes)
        self.suite: P.ProbeSuite | None = None
        self.label_map = label_map
        if self.probes_on:
            if label_map is None:
                raise ValueError("probes need a label_map (TokenLabelMap of the training sequences)")
            loop_states = {name: t for t, name in enumerate(self.spec.loop_states)}
            self.suite = P.ProbeSuite(label_map, loop_states=loop_states or None, l2=l2, control_seed=seed,
                                      split_seed=seed, test_fraction=test_fraction)
        self._update_probe: P.MultiTaskRidgeProbe | None = None
        self._update_tally: dict[str, P.Tally] = {}
        self.n_seen = 0
        self._max_test_seen = -1

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
            total += self.suite.nbytes
        if self._update_probe is not None:
            total += self._update_probe.nbytes
        return total

    def is_test(self, seq_id: int) -> bool:
        return seq_id >= self.n_train

    # -- one batch -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, seq_ids: Iterable[int], tok: torch.Tensor, cache: Mapping[str, torch.Tensor],
               logits: torch.Tensor) -> None:
        """Fold one batch in: ``tok`` [b, seq] (the batch's tokens), ``cache`` {hook: tensor} with every hook of
        ``spec.hook_names()``, ``logits`` [b, seq, vocab] of the forward, ``seq_ids`` the global ids."""
        spec, model = self.spec, self.model
        seq_ids = list(seq_ids)
        b = tok.shape[0]
        # 4. lens first (large matmuls, all threads), at the lens positions only
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
        del lens
        small = torch_threads(self.small_op_threads) if tok.device.type == "cpu" else nullcontext()
        with small:
            self._diagnostics(cache)
            if spec.is_mesh:
                self._router(cache)
            if self.suite is not None:
                self._probe_batch(seq_ids, tok, cache)
        self.n_seen += b

    def _diagnostics(self, cache: Mapping[str, torch.Tensor]) -> None:
        spec = self.spec
        # 1. relative update per block -> [b, n_blocks]
        r = torch.stack([M.relative_update(cache[o], cache[i]) for _, i, o in spec.blocks], dim=1)
        self._rs("update").update_batch(r)
        # 2. CKA and 3. spectra: states stacked [b, S, n, d]
        X = torch.stack([cache[h] for _, h in spec.states], dim=1)
        self._rs("cka_rbf").update_batch(M.cka_matrix(X, "rbf", sigma_frac=self.sigma_frac))
        self._rs("cka_linear").update_batch(M.cka_matrix(X, "linear"))
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

    def _probe_batch(self, seq_ids: list[int], tok: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> None:
        spec, suite = self.spec, self.suite
        mem = cache[spec.final_memory_hook] if spec.is_mesh else None
        for i, sid in enumerate(seq_ids):
            feats = {name: cache[h][i] for name, h in spec.states}
            if mem is not None:
                feats.update({f"m{s}": mem[i, s] for s in range(mem.shape[1])})
            updates = [cache[o][i] - cache[a][i] for _, a, o in spec.core_steps]
            if self.is_test(sid):
                self._max_test_seen = max(self._max_test_seen, sid)
                suite.evaluate(tok[i], feats, seq_id=sid, split="test")
                self._update_eval(tok[i], updates)
            else:
                if self._max_test_seen >= 0:
                    raise ValueError("probe training sequences must all come before the first test sequence")
                suite.update(tok[i], feats, seq_id=sid, split="train")
                self._update_fit(tok[i], updates)

    # loop-index probe on the updates f_core(h^(t)) - h^(t): same probe class and l2 as the suite
    def _update_rows(self, tok: torch.Tensor, updates: list[torch.Tensor]):
        K = len(updates)
        rows = P.token_task_rows(tok.shape[0], self.suite.tasks).to(tok.device)
        X = torch.cat([u[rows] for u in updates])
        y = torch.arange(K, device=tok.device).repeat_interleave(rows.numel())
        ctrl = P.control_labels(tok[rows], K, self.seed, salt=P.LOOP_TASK).repeat(K)
        return X, {P.LOOP_TASK: y, P.LOOP_TASK + P.CONTROL_SUFFIX: ctrl}

    def _update_fit(self, tok: torch.Tensor, updates: list[torch.Tensor]) -> None:
        if not updates:
            return
        X, labels = self._update_rows(tok, updates)
        if X.shape[0] == 0:
            return
        if self._update_probe is None:
            K = len(updates)
            self._update_probe = P.MultiTaskRidgeProbe(X.shape[1], {k: K for k in labels}, self.l2)
        self._update_probe.partial_fit(X, labels)

    def _update_eval(self, tok: torch.Tensor, updates: list[torch.Tensor]) -> None:
        p = self._update_probe
        if not updates or p is None or p.n == 0:
            return
        X, labels = self._update_rows(tok, updates)
        if X.shape[0] == 0:
            return
        for task, pred in p.predict(X).items():
            maj = int(p.class_counts(task).argmax())
            self._update_tally.setdefault(task, P.Tally()).add(pred, labels[task], maj)

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
        if spec.kind == "vanilla":
            notes.append("vanilla model: states are h_emb and the residual stream after each layer "
                         "(blocks.{u}.hook_resid_post); relative update per layer; no coda lens")
        # probes
        if self.suite is None:
            out["probes"] = None
            notes.append("probes skipped (--no-probes)")
        else:
            out["probes"] = self._probe_result(notes)
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
        return to_jsonable(out)

    def _probe_result(self, notes: list[str]) -> dict[str, Any]:
        suite, spec = self.suite, self.spec
        if self._max_test_seen < 0:
            raise ValueError("no test sequence was fed to the probes")
        res = suite.results()
        lm = self.label_map
        features = spec.state_names + ([f"m{b}" for b in range(spec.n_slots)] if spec.is_mesh else [])
        token = {f: res[f] for f in features if f in res}
        loop_index = None
        if spec.loop_states:
            state = res.get(suite.loop_key, {}).get(P.LOOP_TASK)
            upd = None
            p = self._update_probe
            if p is not None and self._update_tally:
                upd = P.probe_fields(self._update_tally.get(P.LOOP_TASK),
                                     self._update_tally.get(P.LOOP_TASK + P.CONTROL_SUFFIX),
                                     float(p.class_counts(P.LOOP_TASK).sum()))
            loop_index = {"state": state, "update": upd}
            if len(spec.loop_states) == 1:
                notes.append("K = 1: the loop-index probe has a single class (trivially 100%)")
        else:
            notes.append("loop-index probe skipped: the model has no loop")
        return {
            "config": {
                "classifier": "closed-form ridge classifier on one-hot targets, standardized features, argmax "
                              "(sklearn RidgeClassifier model), streamed sufficient statistics",
                "l2": self.l2, "max_classes": self.max_classes, "n_classes": int(lm.n_classes),
                "split": f"by sequence index: the last max(1, round({self.test_fraction} N)) sequences are test",
                "n_train_seqs": self.n_train, "n_test_seqs": self.n_test,
                "rows": "every position t in [2, seq-2] of a sequence",
                "control": f"Hewitt & Liang: a fixed random label per current token type, drawn from the task's "
                           f"label distribution (seed {self.seed}); loop index: random map to [0, K)",
            },
            "features": features,
            "tasks": list(suite.tasks),
            "token": token,
            "loop_index": loop_index,
        }
