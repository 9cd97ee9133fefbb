"""Analyses with ground truth: a model trained on a synthetic task (:mod:`meshprobe.data.tasks`), whose per-hop latents
are known, read against those latents. Plain functions on tensors (``task_states`` and the two model-running
functions take the model); plotting is in :mod:`meshprobe.analysis.plots.tasks`.

    spec = tasks.task_from_entry(model.checkpoint_config["metadata"]["task"])
    result = analyze_task(model, spec, n_sequences=256)     # everything below, JSON-ready

* :func:`latent_map` -- the t x t' map: how well each state (h_emb, h^(0..K), h_out; every layer of a vanilla
  model; each MeSH memory slot after the last write) decodes the hop-t' latent hop_t'(i) -- does loop t carry
  hop t?
* :func:`retention` -- how well x_i and x_{i-1} stay decodable at every position through the loops (a hop from
  i must find the position k with x_{k-1} = x_i and read its x_k).
* :func:`lens_accuracy` -- task accuracy of the answer read from each state by the model's own read-out
  (``model.readout``: the coda, then final LayerNorm + unembedding; h_out without the coda).
* :func:`patching` -- activation patching per loop step: h^(t), or one memory slot after a MeSH write, is
  replaced by its value on a corrupted sequence (``run_with_hooks``), and the change of the answer's logit
  difference is measured (a causal test beside the correlational probes).

Probe (:func:`probe_labels`), chosen here: a multinomial logistic probe (softmax + L2 on z-scored features,
:func:`meshprobe.analysis.probes.softmax.fit_softmax_cv`, L2 by 2-fold cross-validation over training sequences) on
every position where the label is defined; train / test split by sequence (30% of the sequences held out, by a
seeded hash); at most ``max_train_rows`` training rows (a seeded hash sample). Reported: held-out accuracy with
a 95% bootstrap CI over test sequences, and ``chance`` = the share of the most frequent training label among the
test rows (what always answering it scores; labels are near uniform over the v symbols).

Patching metric, chosen here: the corrupted sequence is an independent sequence of the same task with the same
prefix (the evaluation stream at another seed); at positions where both the clean answer a and the corrupted
answer b are defined and differ, LD = logit_a - logit_b. ``effect`` = sum(LD_clean - LD_patched) /
sum(LD_clean - LD_corrupt) over those positions: 0 = patching the site changes nothing, 1 = the answer is
fully the corrupted one's. Because every position is patched at once, a site that carries all the information
the answer needs (the loop state of a base model) scores ~1 at every step; a lower score means the information
also travels another way (the anchor, the memory slots) at that step.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from meshprobe.data import tasks
from meshprobe.analysis.probes.softmax import fit_softmax_cv
from meshprobe.analysis.stats import bootstrap_ratio_ci, is_test_sequence, sequence_sums, unit_hash
from meshprobe.hooks import state_hooks

__all__ = ["task_states", "probe_labels", "label_map", "latent_map", "retention", "lens_accuracy", "patch_sites",
           "patching", "analyze_task"]


def _last_memory_hook(cfg) -> str | None:
    if cfg.is_vanilla or cfg.variant != "mesh":
        return None
    return f"loop.{cfg.n_loops - 1}.mesh.hook_memory"


@torch.no_grad()
def task_states(model, tokens, chunk: int = 256) -> dict[str, Tensor]:
    """{state name: [N, L, d] float32} for token ids [N, L]: the states of :func:`meshprobe.hooks.state_hooks`
    (h_emb, h^(0), ..., h^(K), h_out; vanilla: h_emb, layer 1, ..., h_out) and, for MeSH, ``slot j`` = memory
    slot j after the last loop step's write."""
    tokens = torch.as_tensor(tokens)
    named = state_hooks(model.cfg)
    mem = _last_memory_hook(model.cfg)
    wanted = {hook for _, hook in named} | ({mem} if mem else set())
    parts: dict[str, list[Tensor]] = {}
    for a in range(0, len(tokens), chunk):
        _, cache = model.run_with_cache(tokens[a:a + chunk].to(next(model.parameters()).device),
                                        names_filter=lambda n: n in wanted)
        for name, hook in named:
            parts.setdefault(name, []).append(cache[hook].float().cpu())
        if mem:
            for j in range(model.cfg.mesh_slots):
                parts.setdefault(f"slot {j}", []).append(cache[mem][:, j].float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def probe_labels(features: Tensor, labels, classes: int, *, test_fraction: float = 0.3, seed: int = 0,
                 max_train_rows: int = 4000, l2_grid=(1e-2, 1e-3, 1e-4), folds: int = 2) -> dict:
    """Decodability of ``labels`` [N, L] (ints in [0, classes), negative = undefined, not used) from
    ``features`` [N, L, d] by the logistic probe of the module docstring. Returns ``accuracy``, ``ci``,
    ``chance``, ``n_train``, ``n_test``, ``l2``."""
    features = torch.as_tensor(features).float()
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    N, L = labels.shape
    seq, pos = torch.nonzero(labels >= 0, as_tuple=True)
    test = torch.from_numpy(is_test_sequence(seq.numpy(), test_fraction, seed))
    train_idx = torch.nonzero(~test).squeeze(1)
    if len(train_idx) > max_train_rows:
        keep = np.argsort(unit_hash((seq[train_idx] * L + pos[train_idx]).numpy(), seed, "rows"))[:max_train_rows]
        train_idx = train_idx[torch.from_numpy(np.sort(keep))]
    test_idx = torch.nonzero(test).squeeze(1)
    y = labels[seq, pos]
    if len(train_idx) < 2 or len(test_idx) < 1:
        raise ValueError(f"too few labelled rows to probe ({len(train_idx)} train, {len(test_idx)} test)")
    X = features[seq, pos]
    probe = fit_softmax_cv(X[train_idx], y[train_idx], seq[train_idx], classes, grid=l2_grid, folds=folds, seed=seed)
    correct = (probe.predict(X[test_idx]) == y[test_idx]).double()
    num, den = sequence_sums(correct, seq[test_idx])
    acc = float(correct.mean())
    lo, hi = bootstrap_ratio_ci(num, den, seed=seed)
    majority = int(torch.bincount(y[train_idx], minlength=classes).argmax())
    return {"accuracy": acc, "ci": [lo, hi], "chance": float((y[test_idx] == majority).double().mean()),
            "n_train": int(len(train_idx)), "n_test": int(len(test_idx)), "l2": probe.l2}


def label_map(states: dict[str, Tensor], labels: dict[str, np.ndarray], classes: int, **probe_kw) -> dict:
    """Every state against every label set: ``{"states", "targets", "accuracy" [S][T], "ci" [S][T][2],
    "chance" [T]}`` (rows in the order of ``states``, columns in the order of ``labels``)."""
    out = {"states": list(states), "targets": list(labels), "accuracy": [], "ci": [], "chance": []}
    for name, feats in states.items():
        res = [probe_labels(feats, lab, classes, **probe_kw) for lab in labels.values()]
        out["accuracy"].append([r["accuracy"] for r in res])
        out["ci"].append([r["ci"] for r in res])
        out["chance"] = [r["chance"] for r in res]
    return out


def latent_map(states: dict[str, Tensor], batch: tasks.TaskBatch, symbols: int, **probe_kw) -> dict:
    """The t x t' map: each state against hop_t'(i) for t' = 1..hops (``batch.latents``; undefined skipped)."""
    labels = {f"hop_{t + 1}": batch.latents[:, t] for t in range(batch.latents.shape[1])}
    return label_map(states, labels, symbols, **probe_kw)


def retention(states: dict[str, Tensor], batch: tasks.TaskBatch, symbols: int, **probe_kw) -> dict:
    """Each state against x_i and x_{i-1} at every symbol position (prefix positions and x_{-1} skipped)."""
    tok = np.asarray(batch.tokens)
    cols = np.arange(tok.shape[1])
    x_i = np.where(cols >= batch.offset, tok, -1)
    x_prev = np.full_like(tok, -1)
    x_prev[:, 1:] = np.where(cols[1:] - 1 >= batch.offset, tok[:, :-1], -1)
    return label_map(states, {"x_i": x_i, "x_{i-1}": x_prev}, symbols, **probe_kw)


@torch.no_grad()
def lens_accuracy(model, states: dict[str, Tensor], targets, symbols: int) -> dict[str, float]:
    """{state: task accuracy of model.readout(state)} (through the coda, except h_out which is past it)."""
    out = {}
    for name, h in states.items():
        logits = model.readout(h.to(next(model.parameters()).device), through_coda=name != "h_out")
        out[name] = tasks.task_accuracy(logits, torch.as_tensor(targets), symbols)
    return out


def patch_sites(cfg) -> list[tuple[str, str, int | None]]:
    """(site name, hook, slot or None): h^(t) for t = 0..K (vanilla: every layer's output) and, for MeSH,
    each memory slot after the entry write and after every loop step's write."""
    if cfg.is_vanilla:
        return [(f"layer {u + 1}", f"blocks.{u}.hook_resid_post", None) for u in range(cfg.unrolled_depth - 1)]
    K = cfg.n_loops
    sites = [("h^(0)", "loop.0.hook_state_in", None)] + [(f"h^({t + 1})", f"loop.{t}.hook_state_out", None)
                                                          for t in range(K)]
    if cfg.variant == "mesh":
        steps = [("entry", "entry.mesh.hook_memory")] + [(f"loop {t + 1}", f"loop.{t}.mesh.hook_memory")
                                                         for t in range(K)]
        sites += [(f"slot {j} @ {step}", hook, j) for step, hook in steps for j in range(cfg.mesh_slots)]
    return sites


def _logit_diff(logits: Tensor, a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    la = logits.gather(-1, a.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lb = logits.gather(-1, b.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (la - lb)[mask].double()


@torch.no_grad()
def patching(model, clean: tasks.TaskBatch, corrupt: tasks.TaskBatch, sites=None, seed: int = 0) -> dict:
    """Activation patching (module docstring): ``{"sites", "effect", "ci", "ld_clean", "ld_corrupt",
    "ld_patched", "positions"}``; LDs are means over the scored positions."""
    dev = next(model.parameters()).device
    sites = patch_sites(model.cfg) if sites is None else sites
    xc, xx = torch.as_tensor(clean.tokens, device=dev), torch.as_tensor(corrupt.tokens, device=dev)
    a, b = torch.as_tensor(clean.targets, device=dev), torch.as_tensor(corrupt.targets, device=dev)
    mask = (a >= 0) & (b >= 0) & (a != b)
    seq = torch.nonzero(mask, as_tuple=True)[0].cpu()
    hooks = {h for _, h, _ in sites}
    logits_x, cache = model.run_with_cache(xx, names_filter=lambda n: n in hooks)
    ld_c, ld_x = _logit_diff(model(xc), a, b, mask), _logit_diff(logits_x, a, b, mask)
    out = {"sites": [s for s, _, _ in sites], "effect": [], "ci": [], "ld_patched": [],
           "ld_clean": float(ld_c.mean()), "ld_corrupt": float(ld_x.mean()), "positions": int(mask.sum())}
    den, _ = sequence_sums((ld_c - ld_x).cpu(), seq)
    for _, hook, slot in sites:
        def fn(act, hook=None, name=hook, slot=slot):
            if slot is None:
                return cache[name]
            act = act.clone()
            act[:, slot] = cache[name][:, slot]
            return act

        ld_p = _logit_diff(model.run_with_hooks(xc, fwd_hooks=[(hook, fn)]), a, b, mask)
        num, _ = sequence_sums((ld_c - ld_p).cpu(), seq)
        out["effect"].append(float((ld_c - ld_p).sum() / (ld_c - ld_x).sum()))
        out["ci"].append(list(bootstrap_ratio_ci(num, den, seed=seed)))
        out["ld_patched"].append(float(ld_p.mean()))
    return out


def analyze_task(model, spec: tasks.TaskSpec, n_sequences: int = 256, seed: int = 0, *,
                 batch: tasks.TaskBatch | None = None, **probe_kw) -> dict:
    """All four analyses on ``n_sequences`` evaluation sequences at p = hops (evaluation seed ``seed``, or the
    given ``batch`` of them; the corrupted sequences for patching from seed ``seed + 1``). JSON-ready."""
    was_training = model.training
    model.eval()
    batch = batch if batch is not None else tasks.eval_set(spec, n_sequences, seed=seed)
    corrupt = tasks.eval_set(spec, n_sequences, seed=seed + 1)
    states = task_states(model, batch.tokens)
    with torch.no_grad():
        logits = model(torch.as_tensor(batch.tokens, device=next(model.parameters()).device))
    out = {"task": spec.entry(), "n_sequences": n_sequences, "seed": seed,
           "layout": model.cfg.layout, "variant": model.cfg.variant,
           "task_acc": tasks.task_accuracy(logits, batch.targets, spec.symbols),
           "latent_map": latent_map(states, batch, spec.symbols, seed=seed, **probe_kw),
           "retention": retention(states, batch, spec.symbols, seed=seed, **probe_kw),
           "lens": lens_accuracy(model, states, batch.targets, spec.symbols),
           "patching": patching(model, batch, corrupt, seed=seed)}
    model.train(was_training)
    return out
