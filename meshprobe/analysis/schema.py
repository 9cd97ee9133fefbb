"""metrics.json: its format name and version, every key documented (:data:`METRICS_KEYS`), and the JSON
conversion of analysis results.

:func:`metric_key_paths` lists the keys of an actual output in the same notation (``models[]`` = each entry of
the list; ``*`` = a feature / task name); a test checks both agree.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

FORMAT, FORMAT_VERSION = "meshprobe-analyze", 1

_PROBE_FIELDS = {
    "acc": "test accuracy of the probe",
    "control_acc": "test accuracy of the same probe trained on the Hewitt & Liang control task",
    "selectivity": "acc - control_acc",
    "chance": "majority-class accuracy on the test rows (most frequent training label)",
    "control_chance": "majority-class accuracy of the control task on the test rows",
    "selectivity_vs_chance": "(acc - chance) - (control_acc - control_chance)",
    "n_train": "training rows",
    "n_test": "test rows",
}
_MS = "mean over samples", "std over samples (ddof=1)"

METRICS_KEYS: dict[str, str] = {
    "format": f'"{FORMAT}"',
    "version": "format version of this file (int)",
    "meshprobe_version": "meshprobe version that wrote the file",
    "models": "one entry per analysed checkpoint, in command-line order",
    "models[].name": "display name (--names, else the checkpoint folder name)",
    "models[].checkpoint": "checkpoint path (null when analyze_model was called on a model object)",
    "models[].model": "the model config (summary)",
    "models[].model.kind": '"recursive" or "vanilla"',
    "models[].model.layout": "layout string, e.g. 1+2R2+1",
    "models[].model.variant": "variant (base, residual, anchor, mesh, vanilla, ...)",
    "models[].model.d_model": "hidden width d",
    "models[].model.n_loops": "K (0 for vanilla)",
    "models[].model.mesh_slots": "B, MeSH buffer slots (null for other variants)",
    "models[].model.unrolled_depth": "layers in the unrolled forward",
    "models[].model.vocab_size": "model vocabulary",
    "models[].model.n_ctx": "model context length",
    "models[].model.parameters": "parameter counts",
    "models[].model.parameters.total": "all parameters",
    "models[].model.parameters.non_embedding": "all but embedding and unembedding",
    "models[].model.parameters.router": "MeSH router parameters",
    "models[].data": "the token sample and the run",
    "models[].data.source": "where the tokens came from (data spec + split, or a .npy file)",
    "models[].data.n_samples": "N, sequences analysed",
    "models[].data.seq_len": "tokens per sequence",
    "models[].data.seed": "sampling / control-task seed",
    "models[].data.batch_size": "sequences per forward",
    "models[].data.device": "device the analysis ran on",
    "models[].data.seconds": "wall time of the analysis (s)",
    "models[].states": "state names in forward order: h_emb, h^(0) ... h^(K), h_out (vanilla: h_emb, layer 1 ..., h_out)",
    "models[].blocks": "block names of the relative update: prelude, loop 1 ... loop K, coda (vanilla: layer 1 ...)",
    "models[].update": "relative update magnitude r(f, h) per block (paper Fig 1a / 3)",
    "models[].update.mean": "relative update r per block, " + _MS[0],
    "models[].update.std": "relative update r per block, " + _MS[1],
    "models[].cka": "pairwise CKA between states, tokens of one sample as examples (paper Fig 1b / 4)",
    "models[].cka.rbf": "RBF kernel",
    "models[].cka.rbf.mean": "[S][S] RBF-kernel CKA between states, " + _MS[0],
    "models[].cka.rbf.std": "[S][S] RBF-kernel CKA, " + _MS[1],
    "models[].cka.linear": "linear kernel",
    "models[].cka.linear.mean": "[S][S] linear CKA between states, " + _MS[0],
    "models[].cka.linear.std": "[S][S] linear CKA, " + _MS[1],
    "models[].cka.sigma_frac": "RBF bandwidth = sigma_frac * median pairwise distance (per state matrix)",
    "models[].cka.estimator": "HSIC estimator used (biased)",
    "models[].spectrum": "normalized singular values per state (paper Fig 1c / 5)",
    "models[].spectrum.top": "number of singular values kept",
    "models[].spectrum.center": "whether states were centered before the SVD (false)",
    "models[].spectrum.mean": "[S][top] sigma_i / sigma_0 per state, " + _MS[0] + " (null past min(seq, d))",
    "models[].spectrum.std": "[S][top] sigma_i / sigma_0 per state, " + _MS[1],
    "models[].effective_rank": "one effective rank per state",
    "models[].effective_rank.definition": "which effective rank (entropy effective rank, Roy & Vetterli 2007)",
    "models[].effective_rank.mean": "[S] effective rank per state, " + _MS[0],
    "models[].effective_rank.std": "[S] effective rank per state, " + _MS[1],
    "models[].lens": "next-token loss of intermediate states (a logit lens)",
    "models[].lens.states": "states decoded directly (final LN + unembedding): all states",
    "models[].lens.positions": "positions decoded per sample: lens_positions (default 64) evenly spaced over 0..seq-2, or all seq-1",
    "models[].lens.loss": "direct decoding of every state",
    "models[].lens.loss.mean": "[S] next-token cross-entropy (nats) of each state decoded directly, " + _MS[0],
    "models[].lens.loss.std": "[S] the same, " + _MS[1],
    "models[].lens.coda_states": "states also decoded through the coda: h^(0) ... h^(K) (empty for vanilla)",
    "models[].lens.coda_loss": "decoding through the coda (null for vanilla)",
    "models[].lens.coda_loss.mean": "cross-entropy of each coda state run through the coda, " + _MS[0],
    "models[].lens.coda_loss.std": "the same, " + _MS[1],
    "models[].lens.model_loss": "the model's own loss",
    "models[].lens.model_loss.mean": "the model's own next-token loss at the lens positions, " + _MS[0],
    "models[].lens.model_loss.std": "the model's own next-token loss at the lens positions, " + _MS[1],
    "models[].probes": "null when probes are off (--no-probes)",
    "models[].probes.config": "probe settings (identical for every feature space and task)",
    "models[].probes.config.classifier": "probe family (closed-form ridge classifier on standardized features)",
    "models[].probes.config.l2": "ridge strength per training row (same for every probe)",
    "models[].probes.config.max_classes": "classes of the token tasks (top token ids of the train split + OTHER)",
    "models[].probes.config.n_classes": "classes actually used",
    "models[].probes.config.split": "how sequences are split into train / test",
    "models[].probes.config.n_train_seqs": "training sequences",
    "models[].probes.config.n_test_seqs": "test sequences",
    "models[].probes.config.rows": "which positions of a sequence are probed",
    "models[].probes.config.control": "how control tasks are built",
    "models[].probes.features": "feature spaces probed: the states, then the MeSH slots m0 ... (if any)",
    "models[].probes.tasks": "token tasks: current, prev1, prev2 (long-lived), next (transient)",
    "models[].probes.token": "{feature: {task: result}} for the token tasks",
    "models[].probes.token.*": "one feature space (a state name or a slot m0, m1, ...)",
    "models[].probes.token.*.*": "one task (current, prev1, prev2, next)",
    **{f"models[].probes.token.*.*.{k}": v for k, v in _PROBE_FIELDS.items()},
    "models[].probes.loop_index": "loop-index probe (null for vanilla models)",
    "models[].probes.loop_index.state": "features h^(t+1), label t",
    "models[].probes.loop_index.update": "features f_core(h^(t)) - h^(t), label t",
    **{f"models[].probes.loop_index.state.{k}": "features h^(t+1), label t: " + v for k, v in _PROBE_FIELDS.items()},
    **{f"models[].probes.loop_index.update.{k}": "features f_core(h^(t)) - h^(t), label t: " + v
       for k, v in _PROBE_FIELDS.items()},
    "models[].router": "MeSH router analysis (null for non-MeSH models)",
    "models[].router.steps": "router steps: entry, loop 1 ... loop K",
    "models[].router.slots": "buffer slots m0 ... m{B-1}",
    "models[].router.write": "write-router weights",
    "models[].router.write.mean": "[steps][B] mean write weight per slot (mean over tokens), " + _MS[0],
    "models[].router.write.std": "[steps][B] the same, " + _MS[1],
    "models[].router.read": "read-router weights",
    "models[].router.read.mean": "[steps][B] mean read weight per slot (mean over tokens), " + _MS[0],
    "models[].router.read.std": "[steps][B] the same, " + _MS[1],
    "models[].router.write_entropy": "write-router entropy per token",
    "models[].router.write_entropy.mean": "[steps] per-token write-router entropy (nats), mean over all tokens",
    "models[].router.write_entropy.std": "[steps] per-token write-router entropy, std over all tokens",
    "models[].router.read_entropy": "read-router entropy per token",
    "models[].router.read_entropy.mean": "[steps] per-token read-router entropy (nats), mean over all tokens",
    "models[].router.read_entropy.std": "[steps] per-token read-router entropy, std over all tokens",
    "models[].router.max_entropy": "log B, the entropy of uniform routing",
    "models[].router.write_read_overlap": "coefficient of f_core(h^(t)) in the step's read",
    "models[].router.write_read_overlap.mean": "[steps] sum_b w_write,b w_read,b (per-sample token mean), " + _MS[0],
    "models[].router.write_read_overlap.std": "[steps] the same, " + _MS[1],
    "models[].router.slot_norm": "slot norms",
    "models[].router.slot_norm.mean": "[steps][B] L2 norm of each slot after the step's write (token mean), " + _MS[0],
    "models[].router.slot_norm.std": "[steps][B] the same, " + _MS[1],
    "models[].notes": "notes: analyses skipped and why, conventions",
}

#: dict paths whose keys are names (features, tasks), written `*` in METRICS_KEYS
VARIABLE_KEY_PATHS = {"models[].probes.token", "models[].probes.token.*"}


def metric_key_paths(obj: Any, prefix: str = "") -> set[str]:
    """Every key path of a metrics.json object in METRICS_KEYS notation (dicts are descended, a list of dicts
    is written ``name[]``, name-keyed dicts of VARIABLE_KEY_PATHS as ``*``; other lists are leaves)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "*" if prefix in VARIABLE_KEY_PATHS else k
            path = f"{prefix}.{key}" if prefix else key
            out.add(path)
            out |= metric_key_paths(v, path)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for x in obj:
            out |= metric_key_paths(x, prefix + "[]")
    return out


def to_jsonable(obj: Any) -> Any:
    """Tensors / arrays -> nested lists of floats; NaN and inf -> None; tuples -> lists."""
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().double().numpy())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)) or obj is None or isinstance(obj, str):
        return bool(obj) if isinstance(obj, np.bool_) else obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    return obj
