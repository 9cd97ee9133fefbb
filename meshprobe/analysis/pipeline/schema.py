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

_CI = " (95% bootstrap over test sequences)"
_TOKEN_FIELDS = {
    "offset": "target offset k: the probe decodes x_{i+k} from the state at position i",
    "accuracy": "held-out accuracy of the balanced logistic probe",
    "ci": "[low, high] of accuracy" + _CI,
    "chance": "1 / classes (balanced classes)",
    "ce": "held-out cross-entropy of the logistic probe (nats)",
    "prior_ce": "cross-entropy of the training class frequencies (log classes)",
    "ce_gain": "prior_ce - ce (nats)",
    "ce_gain_ci": "[low, high] of ce_gain" + _CI,
    "classes": "classes used (the most frequent target types with enough rows)",
    "n_train": "training rows of the logistic probe",
    "n_test": "test rows of the logistic probe",
    "n_train_per_class": "training rows per class",
    "n_test_per_class": "test rows per class",
    "l2": "per-sample L2 of the logistic probe (see config.l2_selection)",
    "r2": "held-out R^2 of the ridge map onto the target token's code (retrieval probe, every position)",
    "r2_ci": "[low, high] of r2" + _CI,
    "retrieval_top1": "share of held-out rows whose nearest code (among all types) is the target's",
    "retrieval_top1_ci": "[low, high] of retrieval_top1" + _CI,
    "retrieval_top5": "share of held-out rows with the target among the 5 nearest codes",
    "retrieval_top5_ci": "[low, high] of retrieval_top5" + _CI,
    "retrieval_majority": "baseline of retrieval_top1: always answering the most frequent training token",
    "n_retrieval_test": "held-out rows of the retrieval probe",
    "ridge_l2": "per-sample L2 of the ridge map (chosen by CV over training sequences)",
}
_INC_FIELDS = {
    "accuracy_base": "accuracy of the logistic probe on h_emb alone",
    "accuracy_joint": "accuracy of the logistic probe on [h_emb, state]",
    "delta_accuracy": "accuracy_joint - accuracy_base",
    "delta_accuracy_ci": "[low, high] of delta_accuracy (paired" + _CI[1:],
    "ce_base": "held-out cross-entropy on h_emb alone (nats)",
    "ce_joint": "held-out cross-entropy on [h_emb, state] (nats)",
    "delta_ce": "ce_base - ce_joint: what the state tells about x_{i+k} beyond x_i (nats)",
    "delta_ce_ci": "[low, high] of delta_ce (paired" + _CI[1:],
    "chance": "1 / classes",
    "classes": "classes used",
    "n_test": "test rows",
    "l2_base": "per-sample L2 of the base probe (h_emb)",
    "l2_joint": "per-sample L2 of the joint probe",
}
_LOOP_FIELDS = {
    "accuracy": "held-out accuracy of the loop-step probe",
    "ci": "[low, high] of accuracy" + _CI,
    "chance": "1 / K",
    "null_mean": "mean accuracy of the probe refitted on permuted training labels",
    "null_q95": "95% quantile of the permutation null",
    "p_value": "(1 + #{null >= accuracy}) / (1 + n_perm)",
    "n_perm": "permutations",
    "l2": "per-sample L2 (CV over training sequences)",
    "n_features": "features (1 for the norm-only baseline)",
    "n_train": "training rows (positions x K)",
    "n_test": "test rows (positions x K)",
}
_LOOP_SETS = {
    "state": "features h^(t+1), label t",
    "update": "features f_core(h^(t)) - h^(t), label t",
    "state_unit": "h^(t+1) / ||h^(t+1)|| (a shrinking norm cannot give t away)",
    "update_unit": "the update divided by its norm",
    "state_norm": "norm-only baseline: one feature, ||h^(t+1)||",
    "update_norm": "norm-only baseline: one feature, the update's norm",
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
    "models[].data.seed": "sampling and probe seed (split, rows, random-init model)",
    "models[].data.batch_size": "sequences per forward",
    "models[].data.device": "device the analysis ran on",
    "models[].data.seconds": "wall time of the analysis (s); null in `meshprobe figures` output, whose files are "
                             "byte-identical from run to run",
    "models[].timing": "seconds per phase of the analysis (null in `meshprobe figures` output): forward (the model's "
                       "forward with the state hooks), lens, diagnostics (relative update, spectra, effective rank), "
                       "cka, router (MeSH), probe_features (streaming the states into the probes), token_probes "
                       "(logistic and retrieval fits), increment, loop_step_probe, random_init_baseline (when run: "
                       "a fresh model's forward and its probes); phases that did not run are absent",
    "models[].timing.*": "seconds spent in this phase",
    "models[].data.accumulator_bytes": "size of the streaming accumulators after the last batch (the same for "
                                       "every N once the probes' row caps bind)",
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
    "models[].probes": "null when probes are off (--no-probes) or the sample supports none",
    "models[].probes.config": "probe settings (identical for every feature space)",
    "models[].probes.config.classifier": "token probe family (balanced multinomial logistic regression)",
    "models[].probes.config.retrieval": "retrieval probe family (ridge map onto a token code)",
    "models[].probes.config.retrieval_code": "the code of the retrieval probe (embedding: the model's input embedding)",
    "models[].probes.config.offsets": "target offsets k probed (x_{i+k})",
    "models[].probes.config.max_classes": "C, at most this many target types per offset",
    "models[].probes.config.max_train_per_class": "cap on training rows per class",
    "models[].probes.config.max_test_per_class": "cap on test rows per class",
    "models[].probes.config.l2_selection": "how the logistic probes' L2 was chosen",
    "models[].probes.config.split": "how sequences are split into train / test",
    "models[].probes.config.n_train_seqs": "training sequences",
    "models[].probes.config.n_test_seqs": "test sequences",
    "models[].probes.config.shared_16gram_fraction": "fraction of test sequences sharing a 16-gram with a training sequence",
    "models[].probes.config.baselines": "what each baseline is",
    **{f"models[].probes.config.baselines.{k}": f"the {k} baseline" for k in
       ("chance", "prior_ce", "retrieval_majority", "h_emb", "increment", "random_init", "loop_step", "ci")},
    "models[].probes.features": "feature spaces probed: the states, then the MeSH slots m0 ... (if any)",
    "models[].probes.token": "{feature: {offset: result}}: token-information and retrieval probes",
    "models[].probes.token.*": "one feature space (a state name or a slot m0, m1, ...)",
    "models[].probes.token.*.*": 'one target offset ("0", "-1", "+1", ...)',
    **{f"models[].probes.token.*.*.{k}": v for k, v in _TOKEN_FIELDS.items()},
    "models[].probes.increment": "{feature: {offset: result}}: increment over h_emb (null without h_emb)",
    "models[].probes.increment.*": "one feature space other than h_emb",
    "models[].probes.increment.*.*": "one non-zero target offset",
    **{f"models[].probes.increment.*.*.{k}": v for k, v in _INC_FIELDS.items()},
    "models[].probes.loop_step": "loop-differentiation probe (null for vanilla models and K < 2)",
    "models[].probes.loop_step.definition": "what the loop-step probe is",
    **{f"models[].probes.loop_step.{s}": v for s, v in _LOOP_SETS.items()},
    **{f"models[].probes.loop_step.{s}.{k}": v for s in _LOOP_SETS for k, v in _LOOP_FIELDS.items()},
    "models[].probes.random_init": "the token probes on a freshly initialised model (null with --no-baseline)",
    "models[].probes.random_init.model": "how the random-init model was made",
    "models[].probes.random_init.features": "feature spaces probed on it (a reduced set: the state before h_out)",
    "models[].probes.random_init.token": "{feature: {offset: result}} as in probes.token",
    "models[].probes.random_init.token.*": "one feature space",
    "models[].probes.random_init.token.*.*": "one target offset",
    **{f"models[].probes.random_init.token.*.*.{k}": v for k, v in _TOKEN_FIELDS.items()},
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

# `meshprobe analyze --dynamics` / `--tuned-lens` (meshprobe.dynamics.analyze); written only when asked for
_ORBIT = {
    "rel_update": "[T] ||h^(t+1) - h^(t)|| / ||h^(t)|| per step (norms per sequence over [seq, d], mean over sequences)",
    "dist_to_last": "[T+1] ||h^(t) - h^(T)|| / ||h^(T)||, t = 0..T",
    "labels": "per sequence: contracting, cycling or drifting",
    "period": "per sequence: the period p found at the end of the run (1 = fixed point, 0 = none up to 6)",
    "shrink_rate": "per sequence: geometric mean of the step-size ratio over the last 4 steps (< 0.95: contracting)",
    "label": "the label of more than half the sequences, else mixed",
}
_EXIT_ROW = {
    "mean_exit": "mean exit step (1..horizon)",
    "compute_saved": "1 - mean exit step / horizon",
    "answer_changed": "share of positions whose argmax at the exit differs from the reference (the answer at the horizon)",
    "kl_lost": "KL(reference || answer at the exit), nats, mean over positions",
    "premature": "share of positions exiting before their answer settles",
    "accuracy": "next-token (or task) accuracy of the answer at the exit",
    "accuracy_full": "the same at the horizon",
}
_EXIT_SETS = {"trained": "scored up to the trained K", "all_steps": "scored over every step run (when more than K)"}
DYNAMICS_KEYS: dict[str, str] = {
    "models[].dynamics": "loop dynamics (--dynamics; absent without it): a trajectory past K, spectra, exit rules",
    "models[].dynamics.spectrum": "settings of the Jacobian spectra",
    "models[].dynamics.spectrum.k": "singular values / eigenvalues estimated per step",
    "models[].dynamics.spectrum.iters": "Lanczos and Arnoldi iterations per step",
    "models[].dynamics.spectrum.seed": "seed of the start vectors",
    "models[].dynamics.trajectory": "the loop run T steps from the model's own h^(0) (T = 4K or the model's limit)",
    "models[].dynamics.trajectory.steps": "T, loop steps run",
    "models[].dynamics.trajectory.trained_loops": "K, the trained loop count",
    "models[].dynamics.trajectory.n_sequences": "sequences run",
    "models[].dynamics.trajectory.step_size": "[T] ||h^(t+1) - h^(t)||, mean over sequences",
    "models[].dynamics.trajectory.state_norm": "[T+1] ||h^(t)||, mean over sequences",
    **{f"models[].dynamics.trajectory.{k}": v for k, v in _ORBIT.items()},
    **{f"models[].dynamics.trajectory.{k}_dir": v + " -- of the directions (each position's state at unit norm)"
       for k, v in _ORBIT.items()},
    "models[].dynamics.trajectory.sigma1": "[T] top singular value of the Jacobian of step t at h^(t), mean over sequences",
    "models[].dynamics.trajectory.rho": "[T] spectral radius of that Jacobian (Arnoldi), mean over sequences",
    "models[].dynamics.trajectory.sigma1_dir": "[T] sigma_1 of the step on directions (norms held at h^(t)'s)",
    "models[].dynamics.trajectory.rho_dir": "[T] rho of the step on directions",
    "models[].dynamics.trajectory.answer": "the answer read after each step (coda lens; transformers: readout)",
    "models[].dynamics.trajectory.answer.agree_trained": "[T] share of positions whose argmax equals the output at K",
    "models[].dynamics.trajectory.answer.agree_last": "[T] share of positions whose argmax equals the one after T steps",
    "models[].dynamics.trajectory.answer.kl_trained": "[T] KL(output at K || answer after t steps), nats",
    "models[].dynamics.trajectory.answer.accuracy": "[T] next-token accuracy of the answer after t steps",
    "models[].dynamics.trajectory.answer.loss": "[T] next-token cross-entropy of the answer after t steps (nats)",
    "models[].dynamics.exits": "exit rules (Huginn's six, two-hit acceleration, Ouro's gate, oracle) and their cost",
    **{f"models[].dynamics.exits.{s}": v for s, v in _EXIT_SETS.items()},
    **{f"models[].dynamics.exits.{s}.{k}": v for s in _EXIT_SETS for k, v in {
        "horizon": "H, the last step an exit can take; the reference answer is the one after H steps",
        "thresholds": "{rule: threshold}", "thresholds.*": "one rule's threshold",
        "settle_mean": "mean step from which the argmax stays the reference's",
        "rules": "{rule: scores}", "rules.*": "one rule (oracle: exit where the answer settles)",
        **{f"rules.*.{f}": d for f, d in _EXIT_ROW.items()}}.items()},
    "models[].tuned_lens": "lenses per loop state (--tuned-lens; absent without it), scored on held-out sequences",
    "models[].tuned_lens.states": "the states read: h^(0) ... h^(K)",
    "models[].tuned_lens.kl": "[S] KL(final output || lens) in nats per state, per lens",
    "models[].tuned_lens.kl.logit": "final norm + unembedding on the state",
    "models[].tuned_lens.kl.coda": "through the coda first (null for transformers models)",
    "models[].tuned_lens.kl.tuned": "one affine translator per state, then the logit lens",
    "models[].tuned_lens.kl.shared": "one affine translator shared by every state",
    "models[].tuned_lens.fitted": "true: fitted here; false: loaded (--lens DIR)",
    "models[].tuned_lens.n_train": "sequences the translators were fitted on",
    "models[].tuned_lens.n_test": "held-out sequences scored",
    "models[].tuned_lens.fit_steps": "Adam steps after the least-squares start (null when loaded)",
    "models[].tuned_lens.saved": "folder of the saved lens, relative to the output folder (null when loaded)",
}
METRICS_KEYS.update(DYNAMICS_KEYS)

#: dict paths whose keys are names (features, tasks), written `*` in METRICS_KEYS
VARIABLE_KEY_PATHS = {"models[].probes.token", "models[].probes.token.*", "models[].probes.increment",
                      "models[].probes.increment.*", "models[].probes.random_init.token",
                      "models[].probes.random_init.token.*", "models[].timing",
                      *(f"models[].dynamics.exits.{s}.{k}" for s in _EXIT_SETS for k in ("thresholds", "rules"))}
#: sections written only when asked for (--dynamics, --tuned-lens): their keys may be absent from an output
OPTIONAL_SECTIONS = ("models[].dynamics", "models[].tuned_lens")


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
