"""The loop crosscoder: one sparse dictionary read from S sources at once (the loop states h^(0..K), memory
slots), with one decoder per source, so every feature has a decoder-norm *profile* across loop steps.

    cc = train_crosscoder(acts, n_features=512, k=16)     # acts [N, S, d] or an iterable of such batches
    codes = cc.encode(acts)                                # [N, F], non-negative
    recon = cc.decode(codes)                               # [N, S, d], in the units of acts
    cc.profile()                                           # [F, S]: decoder norm per source

The model (Anthropic, "Sparse Crosscoders", 2024): f = act(sum_s W_enc^s (a^s - b_dec^s) + b_enc), a^s ~ W_dec^s f
+ b_dec^s. Choices, and why:

* **Per-source normalisation**: each source is scaled to unit mean squared norm (the factors are fixed from
  the first batch), as the crosscoder paper does, so a loud source (h_out, the slots) does not own the loss.
  The dictionary lives in that normalised space; ``decoder`` / ``decode`` undo the scaling, and ``profile()``
  is read in it, so sources of different scale compare.
* **BatchTopK** (default; Bussmann et al. 2024, the remedy of Minder et al. 2025 for the L1 crosscoder's
  artefacts): each batch keeps its k * batch largest activations (scored by activation x decoder norm), so k is
  the mean number of active features per row. ``encode`` uses a threshold learned during training (the
  running mean of the smallest kept activation), so a row's code does not depend on its batch.
* **Unit-norm decoders**: a feature's decoder, concatenated over sources, is kept at unit norm (the gradient
  along it is removed, the row renormalised after each step); its profile is how that unit is shared out.
* **Dead features**: a feature that has not fired for ``dead_after`` rows is dead; the AuxK loss (Gao et al.
  2024) trains the dead features to reconstruct the residual error, which revives them.
* **L1 variant** (``method="l1"``): ReLU codes, loss = error + l1_coef * sum_f f_f sum_s |W_dec^s_f| (the
  crosscoder paper's form), no norm constraint. It shows the artefact BatchTopK avoids: a feature weak in one
  source loses that source's decoder entirely (*complete shrinkage*).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from meshprobe import _io
from meshprobe.errors import UserError
from meshprobe.features.checks import CONFIG_FILE, METHODS, check_sizes

__all__ = ["LoopCrosscoder", "train_crosscoder", "load_crosscoder", "check_sizes", "METHODS"]

WEIGHTS_FILE = "crosscoder.safetensors"
FORMAT = "meshprobe-crosscoder"


class LoopCrosscoder(nn.Module):
    """A crosscoder over S sources of width d with F features (build it with :func:`train_crosscoder` or
    :func:`load_crosscoder`). ``meta`` holds what it was read from (source names, hooks, model, training)."""

    def __init__(self, n_sources: int, d: int, n_features: int, k: int, method: str = "batchtopk",
                 source_names: list[str] | None = None, meta: dict | None = None):
        super().__init__()
        S, F = n_sources, n_features
        self.k, self.method = int(k), method
        self.W_enc = nn.Parameter(torch.zeros(S, d, F))
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(torch.zeros(F, S, d))
        self.b_dec = nn.Parameter(torch.zeros(S, d))
        self.register_buffer("scale", torch.ones(S))  # normalised = acts * scale (per source)
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK's inference threshold
        self.source_names = list(source_names or [f"source {s}" for s in range(S)])
        self.meta = dict(meta or {})

    @property
    def n_sources(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d(self) -> int:
        return self.W_dec.shape[2]

    @property
    def n_features(self) -> int:
        return self.W_dec.shape[0]

    @property
    def decoder(self) -> torch.Tensor:
        """[F, S, d]: feature f's write into source s, in the units of the activations."""
        return (self.W_dec / self.scale[None, :, None]).detach()

    def profile(self) -> torch.Tensor:
        """[F, S]: the norm of each feature's decoder per source, in the normalised space (every source at
        unit mean squared norm, so sources of different scale compare); BatchTopK rows have unit L2 norm."""
        return self.W_dec.detach().norm(dim=-1)

    # -- the forward pass, in the normalised space -----------------------------------------------------------
    def normalise(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.to(self.W_dec.dtype) * self.scale[:, None]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations [n, F] of normalised rows x [n, S, d]."""
        return torch.relu(torch.einsum("nsd,sdf->nf", x - self.b_dec, self.W_enc) + self.b_enc)

    def select(self, pre: torch.Tensor, batch: bool) -> torch.Tensor:
        """Codes from ReLU pre-activations: L1 keeps them all; BatchTopK keeps the k * n largest (scored by
        activation x decoder norm) when ``batch``, else those above the learned threshold."""
        if self.method == "l1":
            return pre
        if not batch:
            return pre * (pre > self.threshold)
        score = (pre * self.W_dec.norm(dim=(1, 2))).flatten()
        keep = score.topk(min(self.k * pre.shape[0], score.numel()), sorted=False).indices
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(0, keep, True).view_as(pre)
        return pre * (mask & (pre > 0))

    def decode_normalised(self, codes: torch.Tensor) -> torch.Tensor:
        F, S, d = self.W_dec.shape
        return (codes @ self.W_dec.view(F, S * d)).view(-1, S, d) + self.b_dec

    # -- the public API, in the units of the activations -----------------------------------------------------
    @torch.no_grad()
    def encode(self, acts: torch.Tensor, batch_topk: bool = False) -> torch.Tensor:
        """[N, S, d] -> non-negative codes [N, F] (``batch_topk=True``: the training-time batch selection)."""
        acts = _as_rows(acts, self.n_sources, self.d)
        return self.select(self.pre_acts(self.normalise(acts)), batch_topk)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, F] -> reconstruction [N, S, d] in the units of the activations."""
        if codes.ndim != 2 or codes.shape[1] != self.n_features:
            raise UserError(f"codes must be [N, {self.n_features}], got {tuple(codes.shape)}")
        return self.decode_normalised(codes.to(self.W_dec.dtype)) / self.scale[:, None]

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(acts))

    def config(self) -> dict:
        return {"format": FORMAT, "version": 1, "n_sources": self.n_sources, "d": self.d,
                "n_features": self.n_features, "k": self.k, "method": self.method,
                "source_names": self.source_names, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/`` = crosscoder.safetensors + crosscoder.json, atomically (a temp folder beside it,
        config last, then one switch: a reader sees the old folder or the new one, never a mix)."""
        from safetensors.torch import save_file

        path = Path(path)
        with _io.atomic_dir(path, marker=CONFIG_FILE) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp / WEIGHTS_FILE)
            _io.write_json(tmp / CONFIG_FILE, self.config())
        return path


def load_crosscoder(path: str | os.PathLike) -> LoopCrosscoder:
    """A crosscoder saved by :meth:`LoopCrosscoder.save` (UserError naming the folder when it is not one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _io.committed_dir(Path(path), CONFIG_FILE)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: no {CONFIG_FILE} (not a saved crosscoder)")
    cfg = _io.read_json(path / CONFIG_FILE)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{path / CONFIG_FILE}: not a meshprobe crosscoder (format {FORMAT!r})")
    try:
        cc = LoopCrosscoder(cfg["n_sources"], cfg["d"], cfg["n_features"], cfg["k"], cfg["method"],
                            cfg["source_names"], cfg.get("meta"))
        cc.load_state_dict(load_file(path / WEIGHTS_FILE))
    except (KeyError, TypeError, RuntimeError, SafetensorError, OSError) as exc:
        raise UserError(f"{path}: damaged crosscoder ({str(exc).splitlines()[0]})") from None
    return cc.eval()


def _as_rows(acts, S: int | None = None, d: int | None = None) -> torch.Tensor:
    acts = torch.as_tensor(acts)
    if acts.ndim != 3 or not acts.dtype.is_floating_point:
        raise UserError(f"acts must be a float tensor [N, sources, d], got {acts.dtype} {tuple(acts.shape)}")
    if (S is not None and acts.shape[1] != S) or (d is not None and acts.shape[2] != d):
        raise UserError(f"acts have shape {tuple(acts.shape)}, the crosscoder reads [N, {S}, {d}]")
    return acts


def _batches(acts, batch_size: int, steps: int | None, epochs: float, seed: int) -> Iterator[torch.Tensor]:
    """Training batches: random rows of a tensor (``steps``, else ``epochs`` passes), or the batches of an
    iterable cut to ``batch_size`` rows (until it ends or ``steps`` are done)."""
    if isinstance(acts, torch.Tensor):
        n = acts.shape[0]
        total = steps if steps is not None else max(1, math.ceil(epochs * n / batch_size))
        g = torch.Generator().manual_seed(seed)
        perm, at = torch.randperm(n, generator=g), 0
        for _ in range(total):
            if at + batch_size > n:
                perm, at = torch.randperm(n, generator=g), 0
            yield acts[perm[at:at + batch_size]]
            at += batch_size
        return
    done = 0
    for batch in acts:
        batch = _as_rows(batch)
        for start in range(0, batch.shape[0], batch_size):
            if steps is not None and done >= steps:
                return
            yield batch[start:start + batch_size]
            done += 1
