"""One model end to end: its sources, a crosscoder (trained, or loaded and checked against the model), and the
report dict that features.json holds (``features``), plus the files of `meshprobe features`
(:func:`run_features`).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from meshprobe.errors import UserError
from meshprobe.features.checks import DEFAULT_EXPANSION, DEFAULT_K, check_sizes
from meshprobe.features.crosscoder import LoopCrosscoder, load_crosscoder
from meshprobe.features.inputs import ModelInput, context_text, load_model, model_input
from meshprobe.features.classes import lifetimes, summary
from meshprobe.features.sources import SourceSpec, iter_rows, model_batches, source_spec
from meshprobe.features.stats import FeatureStats
from meshprobe.features.train import train_crosscoder

__all__ = ["features", "check_crosscoder", "train_on_model", "report_model", "DEFAULT_K"]



def check_crosscoder(cc: LoopCrosscoder, spec: SourceSpec, d: int, where: str = "load") -> None:
    """UserError unless a loaded crosscoder reads exactly these sources at this width."""
    if cc.source_names != spec.names or cc.d != d:
        raise UserError(f"{where}: the crosscoder reads {cc.n_sources} sources {cc.source_names[:4]}... of width "
                        f"{cc.d}, the model gives {len(spec.names)} sources {spec.names[:4]}... of width {d}")


def train_on_model(model, inp: ModelInput, spec: SourceSpec, n_features: int, k: int, *, seed: int = 0,
                   epochs: int = 8, batch_size: int = 1024, lr: float = 2e-3, buffer_rows: int = 16384,
                   model_batch: int = 8, skip_first: int = 1, progress: bool = False, meta: dict | None = None
                   ) -> LoopCrosscoder:
    """A crosscoder trained on ``epochs`` streamed passes of the model over ``inp.tokens``."""
    batches = model_batches(model, inp.tokens, spec, epochs=epochs, batch_size=batch_size, buffer_rows=buffer_rows,
                            seed=seed, skip_first=skip_first, model_batch=model_batch)
    rows = inp.tokens.shape[0] * (inp.tokens.shape[1] - skip_first)
    total = max(1, epochs * rows // batch_size)
    t0 = time.time()

    def show(step, stats):
        if progress and (step % 50 == 0 or step == 1):
            print(f"  step {step}/~{total}: fvu {stats['fvu']:.3f}, l0 {stats['l0']:.1f}, dead {stats['dead']:.2f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    cc = train_crosscoder(batches, n_features, k, seed, batch_size=batch_size, lr=lr, source_names=spec.names,
                          meta=meta, on_step=show)
    cc.meta["training"]["epochs"] = epochs
    return cc


def _pick_causal(res: dict, n: int) -> list[int]:
    """The ``n`` live features with the most activation mass (frequency x mean code)."""
    mass = res["frequency"] * res["mean_code"]
    order = [int(f) for f in mass.argsort(descending=True) if bool(res["alive"][f])]
    return order[:n]


def _feature_rows(cc, spec, inp, res, life, top_contexts: int) -> list[dict]:
    loop_names = spec.loop_names
    rows = []
    for f in range(cc.n_features):
        b, e = life["birth"][f], life["death"][f]
        row = {"id": f, "class": life["class"][f], "birth": loop_names[b] if b is not None else None,
               "death": loop_names[e] if e is not None else None,
               "profile": [round(float(v), 4) for v in cc.profile()[f]],
               "frequency": float(res["frequency"][f]), "mean_code": float(res["mean_code"][f]),
               "beta": [round(float(v), 4) for v in res["beta"][f]], "artefact": bool(res["artefact"][f])}
        vals, where = res["top_values"][f], res["top_where"][f]
        row["top"] = [{"act": round(float(v), 4), "context": context_text(inp.decode, inp.tokens, int(s), int(p))}
                      for v, (s, p) in zip(vals[:top_contexts], where[:top_contexts].tolist()) if float(v) > 0]
        if res["hop_purity"] is not None:
            purity = res["hop_purity"][f]
            row["hop_purity"] = [round(float(v), 4) for v in purity]
            row["hop"] = int(purity.argmax()) if float(purity.max()) >= 0.5 else None  # 0 = the input symbol
        rows.append(row)
    return rows


def _stats(model, cc, spec, inp, skip_first: int, model_batch: int) -> dict:
    """FeatureStats over every row; for a task, the latents are (the input symbol, hop 1, ..., hop p) per row,
    the input symbol as the control (a feature that follows the token itself, not a hop)."""
    hops = int(inp.latents.shape[1]) if inp.latents is not None else 0
    symbols = int(inp.task["symbols"]) if inp.task else 0
    acc = FeatureStats(cc, hops=hops + 1 if hops else 0, symbols=symbols)
    for acts, where in iter_rows(model, inp.tokens, spec, model_batch, skip_first):
        lat = None
        if hops:
            tok = inp.tokens[where[:, 0], where[:, 1]]
            tok = torch.where(tok < symbols, tok, torch.full_like(tok, -1))  # the prefix is no symbol
            lat = torch.cat([tok[:, None], inp.latents[where[:, 0], :, where[:, 1]]], dim=1)
        acc.update(acts, where, lat)
    return acc.result()


def report_model(model, cc: LoopCrosscoder, spec: SourceSpec, inp: ModelInput, *, causal: int = 8,
                 top_contexts: int = 5, skip_first: int = 1, model_batch: int = 8, causal_samples: int = 32) -> dict:
    """Everything features.json says about one model's crosscoder (module docstring of
    :mod:`meshprobe.features.classes` for the classes, :mod:`~meshprobe.features.stats` for the rest)."""
    from meshprobe.features.causal import ablation_effects

    res = _stats(model, cc, spec, inp, skip_first, model_batch)
    life = lifetimes(cc.profile(), spec.kinds, alive=res["alive"])
    feats = _feature_rows(cc, spec, inp, res, life, top_contexts)
    live = [r for r in feats if r["class"] != "dead"]
    out = {"sources": spec.names, "kinds": spec.kinds, "rows": res["rows"],
           "fvu": {n: float(v) for n, v in zip(spec.names, res["fvu"])}, "fvu_total": res["fvu_total"],
           "l0": res["l0"], "dead_fraction": 1 - len(live) / cc.n_features,
           "artefact_share": sum(r["artefact"] for r in live) / max(1, len(live)),
           "summary": summary(cc.profile(), spec.kinds, life),
           "classes": {c: sum(r["class"] == c for r in feats) for c in dict.fromkeys(life["class"])},
           "births": {n: sum(r["birth"] == n for r in live) for n in spec.loop_names}}
    if res["hop_purity"] is not None:
        out["hop_features"] = {(f"hop {j}" if j else "input"): {n: sum(r.get("hop") == j and r["birth"] == n
                                                                          for r in live) for n in spec.loop_names}
                               for j in range(res["hop_purity"].shape[1])}
    picked = _pick_causal(res, causal)
    if picked:
        n = min(causal_samples, inp.tokens.shape[0])
        tgt = inp.targets[:n] if inp.targets is not None else None
        out["causal"] = ablation_effects(model, cc, spec, inp.tokens[:n], picked, tgt, skip_first=skip_first)
        out["causal"]["class"] = [feats[f]["class"] for f in picked]
        out["causal"]["birth"] = [feats[f]["birth"] for f in picked]
    out["features"] = feats
    return out


def features(model, *, path: str | os.PathLike | None = None, name: str | None = None, load=None,
             n_features: int | None = None, k: int = DEFAULT_K, tokens=None, samples: int | None = None,
             seq_len: int | None = None, data=None, emb: bool = False, out_state: bool = False, slots: bool = True,
             seed: int = 0, epochs: int = 8, batch_size: int = 1024, lr: float = 2e-3, causal: int = 8,
             progress: bool = False) -> tuple[dict, LoopCrosscoder]:
    """A model's crosscoder and its report: ``mp.features.features("checkpoints/loop3-mesh")``.

    ``model``: a loaded model or a folder (a meshprobe checkpoint or a transformers looped directory). Sources:
    h^(0..K), with ``emb`` h_emb, with ``out_state`` h_out, with ``slots`` the MeSH memory slots. ``load``: a
    saved crosscoder (a folder) instead of training one (checked against the sources); else one with
    ``n_features`` (default 4 d) features and ``k`` active per row is trained for ``epochs`` passes. Tokens:
    :func:`~meshprobe.features.inputs.model_input`. Returns ``(report dict, crosscoder)``."""
    if isinstance(model, (str, os.PathLike)):
        path, model = Path(model), load_model(model)
    path = Path(path) if path is not None else (Path(model.checkpoint_dir) if getattr(
        model, "checkpoint_dir", None) is not None else None)
    spec = source_spec(model, emb=emb, out=out_state, slots=slots)
    d = int(model.cfg.d_model)
    cc = load_crosscoder(load) if load is not None else None
    if cc is not None:
        check_crosscoder(cc, spec, d, f"load={load}")
    else:
        n_features = n_features if n_features is not None else DEFAULT_EXPANSION * d
        check_sizes(n_features, k)
    inp = model_input(model, path, tokens=tokens, samples=samples, seq_len=seq_len, data=data, seed=seed)
    meta = {"model": str(path) if path else None, "tokens": inp.source, "sources": spec.to_dict()}
    if cc is None:
        cc = train_on_model(model, inp, spec, n_features, k, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                            progress=progress, meta=meta)
    result = {"name": name or (path.name if path else "model"), "model": str(path) if path else None,
              "layout": getattr(model.cfg, "layout", None), "variant": getattr(model.cfg, "variant", None),
              "n_loops": spec.n_loops, "tokens": inp.source, "task": inp.task,
              "crosscoder": {"n_features": cc.n_features, "k": cc.k, "method": cc.method,
                             "loaded_from": str(load) if load is not None else None,
                             "training": cc.meta.get("training")}}
    result.update(report_model(model, cc, spec, inp, causal=causal))
    return result, cc
