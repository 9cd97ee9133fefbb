"""Writes the notebooks (outputs stripped). Edit here, then run: python notebooks/make_notebooks.py"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
SETUP = '''from pathlib import Path
import os
# Run from notebooks/ or from the repository root: find checkpoints/ either way.
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "checkpoints" / "zoo.json").exists())
CKPT = ROOT / "checkpoints"
import numpy as np, torch
import meshprobe as mp
torch.set_num_threads(1)'''

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        new_markdown_cell("# 01 Quickstart: load a bundled model and look at every loop iteration\n\n"
                          "The bundled zoo (`checkpoints/`) holds a 3-loop recursive family `1+2R3+1` and its 8-layer "
                          "vanilla. Every unrolled call site has its own TransformerLens hook."),
        new_code_cell(SETUP),
        new_code_cell('model = mp.load_checkpoint(CKPT / "loop3-mesh")\ntokenizer = mp.load_tokenizer(CKPT / "loop3-mesh")\n'
                      'print(model.cfg.layout, model.cfg.variant, model.parameter_counts())\n'
                      'print(model.state_hook_names())'),
        new_code_cell('text = "To be, or not to be, that is the question:"\n'
                      'tokens = torch.tensor([tokenizer.encode(text).ids])\n'
                      'logits, cache = model.run_with_cache(tokens)\n'
                      'states = mp.stack_iterations(cache, "hook_state_out")   # h^(1..K): [K, batch, seq, d]\n'
                      'print(states.shape)'),
        new_markdown_cell("How far does each loop step move the state, and what does the model predict if we stop "
                          "early? (`model.readout(h, through_coda=True)` decodes any state through the coda.)"),
        new_code_cell('for t in range(model.cfg.n_loops):\n'
                      '    r = mp.metrics.relative_update(cache[f"loop.{t}.hook_core_out"][0], cache[f"loop.{t}.hook_state_in"][0])\n'
                      '    early = model.readout(cache[f"loop.{t}.hook_state_out"], through_coda=True)[0, -1].argmax()\n'
                      '    print(f"step {t}: relative update {r.item():.3f}, next token if we stopped here: "\n'
                      '          f"{tokenizer.decode([int(early)])!r}")'),
        new_markdown_cell("The MeSH routers: which slot does each step write to and read from (mean over tokens)?"),
        new_code_cell('w = mp.stack_iterations(cache, "mesh.hook_write_weights")[:, 0].mean(1)  # [K, B]\n'
                      'r = mp.stack_iterations(cache, "mesh.hook_read_weights")[:, 0].mean(1)\n'
                      'print("write\\n", w.numpy().round(2), "\\nread\\n", r.numpy().round(2))'),
        new_markdown_cell("Patch one iteration: add noise to the state entering step 1 and watch only later hooks move."),
        new_code_cell('def noisy(x, hook):\n    return x + 0.5 * torch.randn_like(x)\n'
                      'patched = model.run_with_hooks(tokens, fwd_hooks=[("loop.1.hook_state_in", noisy)])\n'
                      'print("max logit change:", (patched - logits).abs().max().item())'),
    ],
    "02_diagnose_one_model.ipynb": [
        new_markdown_cell("# 02 Diagnose one model (the paper's Fig 1)\n\nRelative update per block, RBF-CKA between "
                          "states and the singular-value spectra of the base recursive model, on the bundled validation "
                          "sample. Each analysis is a plain function (`mp.metrics`, `mp.probes`); `mp.analyze` runs them "
                          "all, streaming over samples, and returns a dict with the figures one call away."),
        new_code_cell(SETUP),
        new_code_cell('tokens = torch.from_numpy(np.load(CKPT / "val_tokens.npy")[:60].astype("int64"))\n'
                      'm = mp.analyze(CKPT / "loop3-base", tokens, probes=False, progress=False, name="base")\n'
                      'for block, mean in zip(m["blocks"], m["update"]["mean"]):\n'
                      '    print(f"{block:10s} relative update {mean:.3f}")'),
        new_code_cell('files = m.plot("nb_out/base")\n'
                      'from IPython.display import Image\nImage(filename="nb_out/base/fig1.png")'),
        new_code_cell('print("consecutive-loop RBF CKA:", [round(m["cka"]["rbf"]["mean"][i][i + 1], 3) '
                      'for i in range(1, len(m["states"]) - 2)])\n'
                      'print("effective rank per state:", dict(zip(m["states"], np.round(m["effective_rank"]["mean"], 1))))'),
        new_markdown_cell("## Heads in every loop: attribution and patching with TransformerLens's own tools\n\n"
                          "Per-head hooks (`blocks.{u}.attn.hook_q/k/v/z`, `hook_result`) exist on every unrolled "
                          "layer u, so TL sees each iteration's heads: in `1+2R3+1`, u = 0 is the prelude, u = 1+2t and "
                          "2+2t are the core in loop step t, u = 7 is the coda. TL's `decompose_resid` assumes the "
                          "residual is a plain sum of layer outputs; between MeSH loop steps it is a router-weighted read "
                          "of memory slots, so on this model it refuses with a one-line message naming the replacement."),
        new_code_cell('from transformer_lens import patching\n'
                      'from meshprobe.tl.decompose import LoopedResidualError, decompose_looped, state_parts\n'
                      'torch.set_grad_enabled(False)  # analysis only\n'
                      'mesh = mp.load_checkpoint(CKPT / "loop3-mesh").eval()\n'
                      'clean = tokens[:1, :32]\n'
                      'logits, cache = mesh.run_with_cache(clean)\n'
                      'try:\n    cache.decompose_resid()\nexcept LoopedResidualError as err:\n    print(err)\n'
                      'parts = state_parts(cache, 0)  # h^(1) = sum over slots of read weight x slot\n'
                      'print({k: round(v.norm(dim=-1).mean().item(), 2) for k, v in parts.items()})'),
        new_markdown_cell("**Head attribution.** `decompose_looped(cache, heads=True)` writes the final residual as every "
                          "head's result (and MLP output, bias, embedding) times the multiplicity the loop gives it, summing "
                          "exactly to h_out; TL's own `cache.logit_attrs` then gives each head's direct contribution to the "
                          "logit of the next token (here at the last position)."),
        new_code_cell('stack, labels = decompose_looped(cache, heads=True)\n'
                      'answer = clean[0, -1:]  # the token at the last position, predicted from position -2\n'
                      'attrs = cache.logit_attrs(stack[:, :, -2], answer, pos_slice=-2)[:, 0]\n'
                      'head_rows = [i for i, l in enumerate(labels) if l.startswith("L")]\n'
                      'per_head = attrs[head_rows].view(8, mesh.cfg.n_heads)\n'
                      'site = ["prelude"] + [f"step {t} layer {i}" for t in range(3) for i in range(2)] + ["coda"]\n'
                      'for u in range(8):\n    print(f"u={u} {site[u]:16s}", np.round(per_head[u].numpy(), 3))\n'
                      'print("sum of all components:", round(attrs.sum().item(), 5), "= logit - ln_final.bias . W_U:",\n'
                      '      round((logits[0, -2, answer] - mesh.ln_final.bias @ mesh.W_U[:, answer]).item(), 5))\n'
                      'print("final read weights (loop 2):", cache["loop.2.mesh.hook_read_weights"][0, -2].numpy().round(3))'),
        new_markdown_cell("In this briefly trained checkpoint the last read takes almost only one slot, so heads that "
                          "write elsewhere in loop steps 1 and 2 have almost no direct path to the output; their effect, "
                          "if any, is indirect (through routing and later reads). Patching measures the total effect."),
        new_markdown_cell("**Per-loop head patching.** Corrupt the prompt (shuffle its first half), then patch each head's "
                          "clean output `hook_z` back in, one unrolled layer at a time, with `transformer_lens.patching`. "
                          "The same core head gets one row per loop step."),
        new_code_cell('g = torch.Generator().manual_seed(0)\n'
                      'corrupted = clean.clone()\ncorrupted[0, :16] = clean[0, :16][torch.randperm(16, generator=g)]\n'
                      'def metric(lg):  # mean log-prob of the clean next tokens over the second half\n'
                      '    return lg[0, 15:-1].log_softmax(-1).gather(-1, clean[0, 16:, None]).mean()\n'
                      'clean_value, corrupted_value = metric(logits).item(), metric(mesh(corrupted)).item()\n'
                      'effect = patching.get_act_patch_attn_head_out_all_pos(mesh, corrupted, cache, metric)\n'
                      'recovered = (effect - corrupted_value) / (clean_value - corrupted_value)\n'
                      'print(f"clean {clean_value:.3f}, corrupted {corrupted_value:.3f}")\n'
                      'import matplotlib.pyplot as plt\n'
                      'fig, ax = plt.subplots(figsize=(4, 4))\n'
                      'lim = recovered.abs().max().item()\n'
                      'ax.imshow(recovered.numpy(), cmap="RdBu", vmin=-lim, vmax=lim)\n'
                      'ax.set_yticks(range(8), site); ax.set_xticks(range(mesh.cfg.n_heads)); ax.set_xlabel("head")\n'
                      'ax.set_title("fraction recovered by patching hook_z"); plt.show()'),
    ],
    "03_mesh_vs_recursive.ipynb": [
        new_markdown_cell("# 03 MeSH vs recursive (the paper's Fig 3-5, probes, router maps)\n\n"
                          "Four variants of the same 3-loop model on the same validation sample."),
        new_code_cell(SETUP),
        new_code_cell('from meshprobe.analysis.plots import diagnostics as plots\n'
                      'tokens = torch.from_numpy(np.load(CKPT / "val_tokens.npy")[:40].astype("int64"))\n'
                      'names = ["base", "residual", "anchor", "mesh"]\n'
                      'metrics = [mp.analyze(CKPT / f"loop3-{v}", tokens, probes=(v in ("base", "mesh")), progress=False,\n'
                      '                      name=v) for v in names]\n'
                      'plots.plot_comparison(metrics, names, "nb_out/compare")\n'
                      'from IPython.display import Image\nImage(filename="nb_out/compare/fig3.png")'),
        new_code_cell('Image(filename="nb_out/compare/fig4.png")'),
        new_code_cell('Image(filename="nb_out/compare/fig5.png")'),
        new_markdown_cell("Probes: how well can a balanced logistic probe read the token x[i+k] from each state and "
                          "memory slot (accuracy with its 95% CI; chance = 1/classes; compare with h_emb)?"),
        new_code_cell('mesh = metrics[-1]\nfor feature, offsets in mesh["probes"]["token"].items():\n'
                      '    print(f"{feature:8s}", {k: (round(v["accuracy"], 2), [round(c, 2) for c in v["ci"]]) '
                      'for k, v in offsets.items()})'),
        new_code_cell('mesh.plot("nb_out/mesh")\nImage(filename="nb_out/mesh/router.png")'),
    ],
    "04_train_your_own.ipynb": [
        new_markdown_cell("# 04 Train your own tiny model on CPU\n\nThe same code path as `meshprobe train`; here a "
                          "very small MeSH model for a few steps on the built-in Shakespeare corpus."),
        new_code_cell('import torch\nimport meshprobe as mp\n'
                      'torch.set_num_threads(1)\n'
                      'model_cfg, train_cfg = mp.load_config("tiny", {"variant": "mesh", "d_model": 64, "vocab_size": 1024,\n'
                      '    "steps": 30, "batch_size": 8, "seq_len": 64, "eval_every": 15, "eval_batches": 4, "save_every": 0})\n'
                      'summary = mp.train(model_cfg, train_cfg, "nb_out/tiny-mesh", overwrite=True, quiet=True)\n'
                      'print({k: summary[k] for k in ("status", "step", "val_loss", "val_ppl")})'),
        new_code_cell('model = mp.load_checkpoint("nb_out/tiny-mesh")\n'
                      'print(model.parameter_counts())\n'
                      'import json\nlog = [json.loads(l) for l in open("nb_out/tiny-mesh/train_log.jsonl")]\n'
                      'print([round(r["loss"], 2) for r in log if r["type"] == "train"])'),
    ],
    "05_ground_truth_tasks.ipynb": [
        new_markdown_cell("# 05 Ground-truth tasks: does loop t compute hop t?\n\n"
                          "On p-hop induction every intermediate result is known: hop_1(i) = x_{prev(i)+1}, "
                          "hop_2(i) = hop_1 applied twice. The bundled task zoo (`checkpoints/tasks/`, seed 0 of "
                          "vanilla, base, +anchor, +mesh trained with `meshprobe zoo --spec zoo-tasks`) lets the probes "
                          "be checked against those latents. Small settings here (64 sequences, a fixed probe penalty); "
                          "`meshprobe figures` runs the full analysis."),
        new_code_cell(SETUP + '\nfrom meshprobe.data import tasks\nfrom meshprobe.analysis import ground_truth as gt\n'
                      'TASKS = CKPT / "tasks"\n'
                      'import json\nmanifest = json.loads((TASKS / "zoo.json").read_text())\n'
                      'print([m["name"] for m in manifest["models"]])'),
        new_code_cell('base = mp.load_checkpoint(TASKS / "phop2-base").eval()\n'
                      'entry = base.checkpoint_config["metadata"]["task"]\nspec = tasks.task_from_entry(entry)\n'
                      'print(entry)\nprint(tasks.describe(spec, n_examples=1))'),
        new_markdown_cell("The check an outsider would run: fresh sequences, the prefix in front, argmax over the first "
                          "v logits wherever hop_p is defined."),
        new_code_cell('batch = tasks.eval_set(spec, 64, seed=123)\n'
                      'for m in manifest["models"]:\n'
                      '    model = mp.load_checkpoint(TASKS / m["name"]).eval()\n'
                      '    with torch.no_grad():\n'
                      '        acc = tasks.task_accuracy(model(torch.as_tensor(batch.tokens)), batch.targets, spec.symbols)\n'
                      '    print(f"{m[\'name\']:16s} accuracy {acc:.3f}")'),
        new_markdown_cell("**The t x t' map**: a logistic probe per (state, hop) on held-out sequences. Row h_emb is the "
                          "baseline: what the token alone tells (hop_2 = x_i at many positions, the copy shortcut)."),
        new_code_cell('FAST = dict(l2_grid=(1e-3,), folds=1)\n'
                      'mesh = mp.load_checkpoint(TASKS / "phop2-mesh").eval()\n'
                      'for name, model in (("base", base), ("mesh", mesh)):\n'
                      '    states = gt.task_states(model, batch.tokens)\n'
                      '    m = gt.latent_map(states, batch, spec.symbols, **FAST)\n'
                      '    r = gt.retention(states, batch, spec.symbols, **FAST)\n'
                      '    lens = gt.lens_accuracy(model, states, batch.targets, spec.symbols)\n'
                      '    print(name)\n'
                      '    for s, acc, ret in zip(m["states"], m["accuracy"], r["accuracy"]):\n'
                      '        print(f"  {s:8s} hop_1 {acc[0]:.2f} hop_2 {acc[1]:.2f} | x_i {ret[0]:.2f} x_(i-1) {ret[1]:.2f} "\n'
                      '              f"| lens {lens[s]:.2f}")'),
        new_markdown_cell("**Activation patching**: replace h^(t) (or one memory slot) by its value on another sequence "
                          "and see how much of the answer's logit difference goes over (1 = all of it)."),
        new_code_cell('corrupt = tasks.eval_set(spec, 64, seed=124)\n'
                      'for name, model in (("base", base), ("mesh", mesh)):\n'
                      '    p = gt.patching(model, batch, corrupt)\n'
                      '    print(name, {s: round(e, 2) for s, e in zip(p["sites"], p["effect"]) if "slot" not in s or "loop 1" in s})'),
        new_markdown_cell("Train your own on a task: `--data task:...` works wherever a corpus does "
                          "(here a d32 model for 20 steps)."),
        new_code_cell('model_cfg, train_cfg = mp.load_config("cpu-zoo", {"data": "task:phop:hops=2,symbols=8,seq_len=16,mix=1",\n'
                      '    "vocab_size": 10, "n_ctx": 17, "d_model": 32, "n_heads": 2, "variant": "mesh", "steps": 20,\n'
                      '    "batch_size": 16, "eval_every": 10, "eval_batches": 2, "save_every": 0, "stop_acc": 0.99})\n'
                      'summary = mp.train(model_cfg, train_cfg, "nb_out/task-mesh", overwrite=True, quiet=True)\n'
                      'print({k: summary[k] for k in ("status", "step", "val_loss", "task_acc")})'),
    ],
    "06_published_looped_models.ipynb": [
        new_markdown_cell("# 06 Published looped LMs (Hugging Face), loop step by loop step\n\n"
                          "`meshprobe.hf` wraps a transformers looped language model (Dory, HRM-Text, Inkling-2 loop "
                          "built in; Ouro and Huginn as remote code) and gives every loop step meshprobe's state hooks: "
                          "`hook_embed`, `loop.{t}.hook_state_in`, `loop.{t}.hook_state_out`, `coda.hook_out` (h_out). "
                          "With the weights on disk, the same cells run on a published model:\n\n"
                          "```python\nmodel = hf.load(\"path/to/Ouro-1.4B\", trust_remote_code=True, dtype=\"bfloat16\", "
                          "device=\"cuda\")\nmodel = hf.load(\"path/to/huginn-0125\", trust_remote_code=True, loops=32)\n```\n\n"
                          "Here: a tiny random Dory built in the notebook (its numbers mean nothing; the workflow is the "
                          "point). Remote code runs only with `trust_remote_code=True`."),
        new_code_cell('import numpy as np, torch\n'
                      'from transformers import DoryConfig, DoryForCausalLM\n'
                      'import meshprobe as mp\nfrom meshprobe import hf\n'
                      'torch.set_num_threads(1)\ntorch.manual_seed(0)\n'
                      'config = DoryConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,\n'
                      '    num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_input_layers=1, n_output_layers=1,\n'
                      '    n_recurrent_loops=3, sliding_window=8, max_position_embeddings=128)\n'
                      'DoryForCausalLM(config).save_pretrained("nb_out/dory")   # a model directory, as downloaded\n'
                      'model = hf.load("nb_out/dory")\n'
                      'print(model.spec.architecture, "loop steps:", model.n_loops)\n'
                      'print(model.spec.notes)\nprint(model.state_hook_names())'),
        new_markdown_cell("## Cache every loop\n\nOne forward, every loop step's state (TransformerLens's bridges keep "
                          "only the last step of a repeated module)."),
        new_code_cell('tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))\n'
                      'logits, cache = model.run_with_cache(tokens)\n'
                      'states = mp.states(cache)           # h_emb, h^(0), ..., h^(K), h_out\n'
                      'print({k: tuple(v.shape) for k, v in states.items()})\n'
                      'print(mp.stack_iterations(cache, "hook_state_out").shape)   # [K, batch, seq, d]'),
        new_markdown_cell("## The lens on every step\n\n`model.readout(h)` decodes a state through the model's own final "
                          "norm and LM head: the next-token loss per state, and the KL between consecutive loop steps."),
        new_code_cell('import torch.nn.functional as F\n'
                      'target = tokens[:, 1:]\n'
                      'logp = {name: F.log_softmax(model.readout(h[:, :-1]), -1) for name, h in states.items()}\n'
                      'for name, lp in logp.items():\n'
                      '    ce = F.nll_loss(lp.flatten(0, 1), target.flatten()).item()\n'
                      '    print(f"{name:6s} lens loss {ce:.3f}")\n'
                      'steps = [f"h^({t})" for t in range(1, model.n_loops + 1)]\n'
                      'for a, b in zip(steps, steps[1:]):\n'
                      '    kl = F.kl_div(logp[a], logp[b], log_target=True, reduction="batchmean").item() / logp[a].shape[1]\n'
                      '    print(f"KL({b} || {a}) per token {kl:.2e}")'),
        new_markdown_cell("## The diagnostics\n\nThe same streaming analysis as `meshprobe analyze DIR` (relative "
                          "update per loop step, CKA between states, spectra, lens; the probes with `probes=True`)."),
        new_code_cell('m = mp.analyze(model, tokens, probes=False, progress=False, name="dory")\n'
                      'for block, r in zip(m["blocks"], m["update"]["mean"]):\n'
                      '    print(f"{block:8s} relative update {r:.3f}")\n'
                      'print("consecutive-loop RBF CKA:", [round(m["cka"]["rbf"]["mean"][i][i + 1], 3) '
                      'for i in range(1, len(m["states"]) - 2)])\n'
                      'print(m["notes"][0])'),
        new_markdown_cell("## Patch one loop step\n\nAdd noise to the state leaving step 1: everything before it is "
                          "unchanged, everything after it moves."),
        new_code_cell('def noisy(x, hook):\n    return x + 0.5 * torch.randn_like(x)\n'
                      'with model.hooks(fwd_hooks=[("loop.1.hook_state_out", noisy)]):\n'
                      '    patched_logits, patched = model.run_with_cache(tokens)\n'
                      'for name in model.state_hook_names():\n'
                      '    print(f"{name:22s} changed: {not torch.equal(patched[name], cache[name])}")\n'
                      'print("max logit change:", (patched_logits - logits).abs().max().item())'),
        new_markdown_cell("## Test-time depth\n\n`loops=K` (`--loops K` on the command line) runs K loop steps instead "
                          "of the config's: what do extra loops do to the prediction?"),
        new_code_cell('for K in (1, 3, 6):\n'
                      '    deeper = hf.load("nb_out/dory", loops=K)\n'
                      '    lg = deeper(tokens)\n'
                      '    ce = F.cross_entropy(lg[:, :-1].flatten(0, 1), target.flatten()).item()\n'
                      '    print(f"K = {K}: loss {ce:.4f}")\n'
                      '# the same from the shell:\n'
                      '#   meshprobe info nb_out/dory --loops 6\n'
                      '#   meshprobe analyze nb_out/dory --out nb_out/dory-6 --tokens tokens.npy --loops 6'),
    ],
    "07_loop_features.ipynb": [
        new_markdown_cell("# 07 Features across loop steps: a loop crosscoder\n\n"
                          "A crosscoder is one sparse dictionary read from several sources at once, with one decoder "
                          "per source. Here the sources are the loop states h^(0..K) (and MeSH's memory slots): every "
                          "feature gets a *profile*, its decoder norm per loop step, which says where it is born, how "
                          "long it lives and whether it moves into the slots. BatchTopK training, per-source "
                          "normalisation, unit-norm decoders; `meshprobe features CKPT --out DIR` does all of this "
                          "from the shell (sizes here are tiny, so the notebook runs in CI)."),
        new_code_cell(SETUP + '\nfrom meshprobe.features import lifetimes, planted_features, train_crosscoder'),
        new_markdown_cell("## Planted features first\n\nData whose features have known directions, births, deaths "
                          "and rotations across 4 sources of different scale: does the crosscoder find them, "
                          "with their spans?"),
        new_code_cell('p = planted_features(n_rows=8192, n_sources=4, d=16, n_true=24, active=3, seed=0)\n'
                      'cc = train_crosscoder(p.acts, 32, 3, steps=400, batch_size=256, lr=1e-2)\n'
                      'true = torch.nn.functional.normalize((p.directions * cc.scale[None, :, None]).flatten(1), dim=1)\n'
                      'cos, idx = (true @ torch.nn.functional.normalize(cc.W_dec.detach().flatten(1), dim=1).T).max(1)\n'
                      'life = lifetimes(cc.profile()[idx])\n'
                      'exact = [(cos[j] >= 0.9).item() and life["birth"][j] == p.births[j] and life["death"][j] == p.deaths[j]\n'
                      '         for j in range(len(cos))]\n'
                      'print(f"recovered with the exact span: {sum(exact)} of {len(exact)}")'),
        new_markdown_cell("## A bundled MeSH model\n\n`mp.features.features` reads h^(0..K) and the 6 memory slots "
                          "of `loop3-mesh` through a shuffle buffer, trains the crosscoder and reports: FVU per "
                          "source, lifetime classes, Latent Scaling flags, top contexts, and the causal check."),
        new_code_cell('result, cc = mp.features.features(CKPT / "loop3-mesh", samples=48, epochs=3, n_features=128, k=8,\n'
                      '                                  batch_size=256, lr=3e-3, causal=2)\n'
                      'print(result["sources"])\n'
                      'print({s: round(v, 3) for s, v in result["fvu"].items()})\n'
                      'print(result["classes"])\n'
                      'print({k: v if v is None else round(v, 3) for k, v in result["summary"].items()})'),
        new_code_cell('from IPython.display import Image\n'
                      'from meshprobe.features.plots import plot_profiles\n'
                      'Image(str(plot_profiles(result, "nb_out/features")[0]))'),
        new_markdown_cell("The top contexts of the most active features, and what ablating each at one loop step "
                          "does to the loss (subtract its decoder contribution at that hook):"),
        new_code_cell('top = sorted((f for f in result["features"] if f["class"] != "dead"), key=lambda f: -f["frequency"])[:4]\n'
                      'for f in top:\n'
                      '    print(f["id"], f["class"], f"{f[\'birth\']}..{f[\'death\']}", [t["context"] for t in f["top"][:2]])\n'
                      'c = result["causal"]\n'
                      'for i, f in enumerate(c["features"]):\n'
                      '    print(f"feature {f}: d loss per state", dict(zip(c["sources"], [round(x, 4) for x in c["d_loss"][i]])))'),
        new_markdown_cell("Save and load: safetensors + JSON, written atomically; `meshprobe features CKPT --load DIR` "
                          "checks a saved dictionary against the model before using it."),
        new_code_cell('cc.save("nb_out/features/cc")\n'
                      'back = mp.features.load_crosscoder("nb_out/features/cc")\n'
                      'print(back.source_names, back.decoder.shape, torch.equal(back.profile(), cc.profile()))'),
    ],
    "08_loop_dynamics.ipynb": [
        new_markdown_cell("# 08 Loop dynamics: does the loop contract, where does it settle, when could it stop?\n\n"
                          "A looped model is a dynamical system h^(t+1) = F_t(h^(t); context). `mp.dynamics` gives the "
                          "loop map F_t of a model (`loop_map`), the spectrum of its Jacobian without forming it "
                          "(`spectrum`: top singular values by Lanczos, the spectral radius by Arnoldi), trajectories "
                          "past the trained K (`trajectory`), exit rules (`exits`) and a tuned lens per loop step. "
                          "Here on the bundled `loop3-base` and `loop3-anchor` (K = 3)."),
        new_code_cell(SETUP + '\n'
                      'base = mp.load_checkpoint(CKPT / "loop3-base")\n'
                      'anchor = mp.load_checkpoint(CKPT / "loop3-anchor")\n'
                      'tokens = torch.from_numpy(np.load(CKPT / "val_tokens.npy")[:2, :32].astype("int64"))'),
        new_markdown_cell("## The Jacobian of one loop step\n\n`loop_map(model, tokens, t)` is step t as a function of "
                          "its input state, the context (embeddings, h^(0), MeSH's memory as written so far) fixed; "
                          "`step.h_t` is the model's own h^(t). Each sequence's Jacobian is [seq*d, seq*d] (attention "
                          "couples positions); `spectrum` only ever multiplies vectors by it."),
        new_code_cell('step = mp.dynamics.loop_map(anchor, tokens, 1)\n'
                      'print("step(h^(1)) == h^(2):", torch.allclose(step(step.h_t), mp.dynamics.loop_map(anchor, tokens, 2).h_t, atol=1e-4))\n'
                      's = mp.dynamics.spectrum(step, step.h_t, k=4, iters=30)\n'
                      'print("sigma:", s.sigma.numpy().round(3))\nprint("rho:", s.rho.numpy().round(3))\n'
                      'print("top eigenvalues:", s.eigvals[0].numpy().round(3))'),
        new_markdown_cell("## A planted check\n\nA linear map whose dominant eigenvalues are a complex pair "
                          "0.9 e^(+-2i) (power iteration would oscillate forever): Arnoldi finds it."),
        new_code_cell('import math\n'
                      'n = 12\nP = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n'
                      'core = torch.diag(torch.linspace(0.1, 0.5, n)).double()\n'
                      'core[:2, :2] = 0.9 * torch.tensor([[math.cos(2), -math.sin(2)], [math.sin(2), math.cos(2)]])\n'
                      'A = (P @ core @ torch.linalg.inv(P)).float()\n'
                      'lin = lambda h: (h.reshape(1, n) @ A.T).reshape(1, 3, 4)\n'
                      's = mp.dynamics.spectrum(lin, torch.randn(1, 3, 4), k=2, iters=12)\n'
                      'print("rho", s.rho.item(), "eigenvalues", s.eigvals[0].numpy().round(4))\n'
                      'print("sigma", s.sigma[0].numpy().round(4), "exact", torch.linalg.svdvals(A)[:2].numpy().round(4))'),
        new_markdown_cell("## Past the trained K\n\n12 steps (4K). The states' norms grow in both models, so the "
                          "trajectory is also read on directions (each position's state at unit norm: what the "
                          "final LayerNorm sees). `rho_dir` < 1: directions contract."),
        new_code_cell('traj = {}\nfor name, m in (("base", base), ("anchor", anchor)):\n'
                      '    traj[name] = r = mp.dynamics.trajectory(m, tokens, iters=8, every=3)\n'
                      '    print(f"{name}: states {r[\'label\']}, directions {r[\'label_dir\']}")\n'
                      '    print("  rho_dir      ", [None if v is None else round(v, 3) for v in r["rho_dir"]])\n'
                      '    print("  KL to output at K", [round(v, 3) for v in r["answer"]["kl_trained"]])'),
        new_code_cell('import matplotlib.pyplot as plt\n'
                      'fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))\n'
                      'for name, r in traj.items():\n'
                      '    axes[0].semilogy(range(1, 13), r["rel_update_dir"], "-o", label=name)\n'
                      '    axes[1].semilogy(range(1, 13), r["answer"]["kl_trained"], "-o", label=name)\n'
                      'axes[0].set_title("relative update of the directions"); axes[1].set_title("KL to the output at K")\n'
                      'for ax in axes:\n    ax.axvline(3, color="k", ls=":"); ax.legend()'),
        new_markdown_cell("## Exit rules\n\nHuginn's six rules, the two-hit acceleration rule (and Ouro's gate on "
                          "models that have one), scored against the answer after the horizon: compute saved against "
                          "KL lost. The oracle exits where the answer settles."),
        new_code_cell('r = mp.dynamics.run(anchor, tokens, steps=12)\n'
                      'ex = mp.dynamics.exits(r.logits, r.states)\n'
                      'print(f"horizon {ex[\'horizon\']}, answer settles at step {ex[\'settle_mean\']:.2f} on average")\n'
                      'for rule, row in ex["rules"].items():\n'
                      '    print(f"{rule:14s} exit {row[\'mean_exit\']:5.2f}  saved {row[\'compute_saved\']:.2f}  "\n'
                      '          f"answer changed {row[\'answer_changed\']:.3f}  KL lost {row[\'kl_lost\']:.4f}")'),
        new_markdown_cell("## A tuned lens per loop step\n\nOne affine translator per state (and one shared), fitted to "
                          "the final logits by KL, scored on held-out sequences beside the logit and coda lenses. "
                          "Saved as safetensors + JSON; a lens saved for one model is refused for another."),
        new_code_cell('from meshprobe.dynamics.analyze import lens_section\n'
                      'rows = torch.from_numpy(np.load(CKPT / "val_tokens.npy")[:16, :32].astype("int64"))\n'
                      'lens, sec = lens_section(anchor, rows, fit_steps=20)\n'
                      'for i, state in enumerate(sec["states"]):\n'
                      '    print(state, {k: round(v[i], 3) for k, v in sec["kl"].items()})\n'
                      'lens.save("nb_out/anchor_lens")\n'
                      'mp.dynamics.load_lens("nb_out/anchor_lens", anchor)\n'
                      'try:\n    mp.dynamics.load_lens("nb_out/anchor_lens", base)\n'
                      'except mp.UserError as e:\n    print("refused:", e)'),
        new_markdown_cell("From the shell, the same analyses for any bundled checkpoint or transformers directory "
                          "(figures `dynamics.png`, `lens_kl.png`; sections `dynamics`, `tuned_lens` in metrics.json):\n\n"
                          "```bash\nmeshprobe analyze checkpoints/loop3-anchor --out out/anchor --dynamics --tuned-lens "
                          "--no-probes\n```"),
    ],
}

for name, cells in NOTEBOOKS.items():
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)
