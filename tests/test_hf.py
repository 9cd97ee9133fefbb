"""meshprobe.hf: every loop step of a transformers looped LM as meshprobe's states.

Tiny random models of the three classes transformers 5.24 builds natively (Dory, HRM-Text, Inkling-2 loop),
saved with save_pretrained; stand-ins with the published module names for Ouro and Huginn (remote code).
"""
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import approx_f32, f32_tol
from hf_standins import OuroForCausalLM, RavenForCausalLM, ouro_config, raven_config, write_remote_ouro

from meshprobe import hf, hooks
from meshprobe.cli import main
from meshprobe.errors import UserError

warnings.filterwarnings("ignore", message=".*causal_conv1d.*")


def _dory(loops=3):
    from transformers import DoryConfig, DoryForCausalLM

    return DoryForCausalLM(DoryConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, n_input_layers=1, n_output_layers=1, n_recurrent_loops=loops,
        sliding_window=8, max_position_embeddings=128))


def _hrm():
    from transformers import HrmTextConfig, HrmTextForCausalLM

    return HrmTextForCausalLM(HrmTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        head_dim=16, H_cycles=2, L_cycles=3, max_position_embeddings=64))


def _inkling():
    from transformers import Inkling2LoopForCausalLM, Inkling2LoopTextConfig

    return Inkling2LoopForCausalLM(Inkling2LoopTextConfig(
        vocab_size=128, unpadded_vocab_size=128, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=8, d_rel=4, rel_extent=16, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4,
        loop_num_passes=3, loop_gate_rank=8, max_position_embeddings=128, eos_token_id=None,
        layer_types=["hybrid_sliding", "hybrid"] * 3))


# (builder, first module of the loop body, last module, steps) written from the model code, not from the specs
NATIVE = {
    "dory": (_dory, "model.layers.1", "model.layers.2", 3),
    "hrm": (_hrm, "model.H_module", "model.H_module", 2),
    "inkling": (_inkling, "model.layers.2", "model.layers.3", 3),
}


def _build(kind, seed=0):
    torch.manual_seed(seed)
    return NATIVE[kind][0]().eval()


def _readout_tol(logits):
    """The readout (final norm, then the unembedding: sums of hidden_size = 64 terms) done again."""
    return f32_tol(logits, 64, layers=2)


def _tokens(n=2, seq=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _record(model, x, first, last, **kw):
    """Inputs of `first` and outputs of `last`, call by call, from plain torch hooks (the loop body itself)."""
    mods = dict(model.named_modules())
    ins, outs = [], []
    h1 = mods[first].register_forward_pre_hook(lambda m, a: ins.append(a[0].detach().clone()))
    h2 = mods[last].register_forward_hook(
        lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with torch.no_grad():
            logits = model(input_ids=x, **kw).logits
    finally:
        h1.remove()
        h2.remove()
    return ins, outs, logits


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The three native classes saved with save_pretrained (Dory with a tiny tokenizer of its own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in NATIVE:
        out[kind] = root / kind
        _build(kind).save_pretrained(out[kind])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["to be or not to be that is the question whether tis nobler in the mind"] * 5,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(out["dory"])
    np.save(root / "tokens.npy", _tokens(6, 16).numpy())
    out["tokens"] = root / "tokens.npy"
    return out


@pytest.mark.parametrize("kind", list(NATIVE))
def test_states_equal_the_loop_body_call_by_call(kind):
    model = _build(kind)
    _, first, last, K = NATIVE[kind]
    x = _tokens()
    ins, outs, ref = _record(model, x, first, last, use_cache=False)
    assert len(ins) == len(outs) == K
    w = hf.wrap(model)
    assert w.n_loops == K
    logits, cache = w.run_with_cache(x)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)  # the model's own forward, unchanged
    for t in range(K):
        torch.testing.assert_close(cache[f"loop.{t}.hook_state_in"], ins[t], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"loop.{t}.hook_state_out"], outs[t], rtol=0, atol=0)
    st = hooks.states(cache, K)
    assert list(st) == ["h_emb"] + [f"h^({t})" for t in range(K + 1)] + ["h_out"]
    assert hooks.stack_iterations(cache, "hook_state_out").shape == (K, *x.shape, 64)
    # h_out decoded by the readout gives the model's logits: the lens of the last state is the model
    torch.testing.assert_close(w.readout(cache["coda.hook_out"]), ref.float(), **_readout_tol(ref))
    # the transformers model called directly is untouched by the wrapper's hooks
    _, _, again = _record(model, x, first, last, use_cache=False)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_the_lens_inside_a_hook_does_not_disturb_the_count():
    w = hf.wrap(_build("dory"))  # model.norm is both in the readout and the site of h_out
    x = _tokens()
    _, clean = w.run_with_cache(x)
    seen = []
    with w.hooks(fwd_hooks=[(lambda n: n.endswith("hook_state_out"), lambda h, hook: seen.append(w.readout(h)))]):
        _, cache = w.run_with_cache(x)
    assert len(seen) == 3
    torch.testing.assert_close(cache["coda.hook_out"], clean["coda.hook_out"], rtol=0, atol=0)


def test_each_state_hook_fires_once_per_step():
    w = hf.wrap(_build("hrm"))
    fired = []
    w.run_with_hooks(_tokens(), fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))])
    assert fired.count("hook_embed") == 1 and fired.count("coda.hook_out") == 1
    assert sorted(set(fired)) == sorted(fired)  # no name twice
    assert set(fired) == set(w.state_hook_names()) == set(w.hook_dict)
    assert len([f for f in fired if ".inner." in f]) == 2 * 3 * 2  # H_cycles x L_cycles x (in, out)


def test_hrm_inner_steps_equal_the_L_module_calls():
    model = _build("hrm")
    x = _tokens()
    ins, outs, _ = _record(model, x, "model.L_module", "model.L_module", use_cache=False)
    _, cache = hf.wrap(model).run_with_cache(x)
    for c in range(6):
        t, s = divmod(c, 3)
        torch.testing.assert_close(cache[f"loop.{t}.inner.{s}.hook_state_in"], ins[c], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"loop.{t}.inner.{s}.hook_state_out"], outs[c], rtol=0, atol=0)


@pytest.mark.parametrize("kind,step", [("dory", 1), ("hrm", 0), ("inkling", 1)])
def test_patching_one_step_changes_only_what_follows(kind, step):
    w = hf.wrap(_build(kind))
    x = _tokens()
    clean_logits, clean = w.run_with_cache(x)
    patch = f"loop.{step}.hook_state_out"

    def add(value, hook):
        return value + 0.5

    with w.hooks(fwd_hooks=[(patch, add)]):
        logits, cache = w.run_with_cache(x)
    order = w.state_hook_names()
    k = order.index(patch)
    for name in order[:k]:
        torch.testing.assert_close(cache[name], clean[name], rtol=0, atol=0)
    # the patched value is what the model saw (the same addition on the same values)
    torch.testing.assert_close(cache[patch], clean[patch] + 0.5, rtol=0, atol=0)
    after = f"loop.{step + 1}.hook_state_out"  # (Inkling restarts every pass from the pre-loop state: its
    assert not torch.allclose(cache[after], clean[after])  # next h^(t) is unchanged, the messages carry the patch)
    assert not torch.allclose(logits, clean_logits)


def test_patching_inputs_read_by_pre_hooks():
    """States read off a module's input (h^(t), h_out) are patched by replacing that input."""
    w = hf.wrap(_build("dory"))
    x = _tokens()
    clean_logits, clean = w.run_with_cache(x)

    def add(value, hook):
        return value + 0.5

    with w.hooks(fwd_hooks=[("loop.1.hook_state_in", add)]):
        _, cache = w.run_with_cache(x)
    torch.testing.assert_close(cache["loop.0.hook_state_out"], clean["loop.0.hook_state_out"], rtol=0, atol=0)
    torch.testing.assert_close(cache["loop.1.hook_state_in"], clean["loop.1.hook_state_in"] + 0.5, rtol=0, atol=0)
    assert not torch.allclose(cache["loop.1.hook_state_out"], clean["loop.1.hook_state_out"])
    logits = w.run_with_hooks(x, fwd_hooks=[("coda.hook_out", add)])
    torch.testing.assert_close(logits, w.readout(clean["coda.hook_out"] + 0.5), **_readout_tol(logits))
    assert not torch.allclose(logits, clean_logits)


def test_bfloat16_model_float32_cache(dirs):
    w = hf.load(dirs["hrm"], dtype="bfloat16")
    assert next(w.parameters()).dtype == torch.bfloat16
    logits, cache = w.run_with_cache(_tokens())
    assert cache["loop.1.hook_state_out"].dtype == torch.bfloat16
    lens = w.readout(cache["coda.hook_out"].float())  # the analyses cache float32; the readout casts back
    assert lens.dtype == torch.float32
    torch.testing.assert_close(lens, logits.float(), rtol=0, atol=0)  # the same bfloat16 ops on the same values
    with pytest.raises(UserError, match="dtype must be one of"):
        hf.load(dirs["hrm"], dtype="float8")


def test_loops_sets_the_step_count():
    torch.manual_seed(0)
    model = _hrm().eval()
    x = _tokens()
    default = hf.wrap(model).run_with_cache(x)[0]
    w = hf.wrap(model, loops=4)
    assert model.config.H_cycles == 4 and w.n_loops == 4
    logits, cache = w.run_with_cache(x)
    assert "loop.3.hook_state_out" in cache and "loop.4.hook_state_out" not in cache
    assert not torch.allclose(logits, default)
    ins, _, ref = _record(model, x, "model.H_module", "model.H_module", use_cache=False)
    assert len(ins) == 4
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


def test_a_spec_that_does_not_fit_is_one_line():
    model = _build("dory")
    spec = hf.builtin_spec("DoryForCausalLM", model.config, 3).to_dict()
    with pytest.raises(UserError, match="no module 'model.layers.9'"):
        hf.wrap(model, {**spec, "loop_module": "model.layers.9"})
    w = hf.wrap(model, {**spec, "steps_field": "num_hidden_layers"})  # 4 expected, the model loops 3 times
    with pytest.raises(UserError, match="model.layers.2 was called 3 times in one forward, expected 4") as err:
        w(_tokens())
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown field"):
        hf.wrap(model, {**spec, "loop_modul": "x"})
    with pytest.raises(UserError, match="readout must be a non-empty list"):
        hf.wrap(model, {**spec, "readout": "lm_head"})
    with pytest.raises(UserError, match="loop_read must be one of"):
        hf.wrap(model, {**spec, "loop_read": "output[1]"})
    with pytest.raises(UserError, match="no built-in loop spec"):
        hf.wrap(_GenericLM())


class _GenericLM(torch.nn.Module):
    config = object()

    def get_input_embeddings(self):
        return None


def test_spec_from_a_json_file(tmp_path):
    model = _build("dory")
    spec = hf.builtin_spec("DoryForCausalLM", model.config, 3)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    w = hf.wrap(model, str(path))
    assert w.spec == spec
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON file"):
        hf.wrap(model, str(path))


# -- remote-code models on stand-ins -----------------------------------------------------------------------
def test_ouro_spec_on_a_stand_in():
    torch.manual_seed(0)
    model = OuroForCausalLM(ouro_config()).eval()
    x = _tokens(vocab=50)
    with torch.no_grad():
        _, states, gates = model.model(x)
    w = hf.wrap(model, loops=3)
    assert model.model.total_ut_steps == 3 and model.config.total_ut_steps == 3  # the copy on the module too
    logits, cache = w.run_with_cache(x)
    with torch.no_grad():
        _, states, gates = model.model(x)
    assert len(states) == 3
    for t in range(3):
        torch.testing.assert_close(cache[f"loop.{t}.hook_state_out"], states[t], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"loop.{t}.hook_exit_logit"], gates[t], rtol=0, atol=0)
    torch.testing.assert_close(cache["coda.hook_out"], states[-1], rtol=0, atol=0)
    torch.testing.assert_close(w.readout(cache["coda.hook_out"]), logits, **_readout_tol(logits))


@pytest.mark.parametrize("tuple_blocks", [True, False])
def test_huginn_spec_on_a_stand_in(tuple_blocks):
    torch.manual_seed(0)
    model = RavenForCausalLM(raven_config(tuple_blocks=tuple_blocks)).eval()
    x = _tokens(vocab=50)
    w = hf.wrap(model, loops=5)
    torch.manual_seed(3)  # the initial state is random: same seed, same run
    ins, outs, ref = _record(model, x, "transformer.core_block.0", "transformer.core_block.3", num_steps=5)
    torch.manual_seed(3)
    logits, cache = w.run_with_cache(x)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    assert len(outs) == 5 and w.n_loops == 5
    for t in range(5):
        torch.testing.assert_close(cache[f"loop.{t}.hook_state_in"], ins[t], rtol=0, atol=0)
        torch.testing.assert_close(cache[f"loop.{t}.hook_state_out"], outs[t], rtol=0, atol=0)
    torch.testing.assert_close(w.readout(cache["coda.hook_out"]), logits, **_readout_tol(logits))
    torch.manual_seed(3)
    assert len(hf.wrap(model).run_with_cache(x)[1]) == 2 * 6 + 2  # default: config.mean_recurrence steps


# -- directories, the CLI, remote code -----------------------------------------------------------------------
def test_load_a_saved_directory(dirs):
    w = hf.load(dirs["inkling"])
    x = _tokens()
    _, first, last, _ = NATIVE["inkling"]
    _, outs, ref = _record(w.hf, x, first, last, use_cache=False)
    logits, cache = w.run_with_cache(x)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(hooks.stack_iterations(cache, "hook_state_out"), torch.stack(outs), rtol=0, atol=0)


def test_info_on_saved_directories(dirs, capsys):
    for kind, (_, _, _, K) in NATIVE.items():
        assert main(["info", str(dirs[kind]), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["config"]["n_loops"] == K
        assert [h for h in info["hooks"] if h.endswith("hook_state_out") and ".inner." not in h] == [
            f"loop.{t}.hook_state_out" for t in range(K)]
    assert main(["info", str(dirs["dory"]), "--json", "--loops", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["n_loops"] == 5
    assert main(["info", str(dirs["hrm"])]) == 0
    assert "loop.1.inner.2.hook_state_out" in capsys.readouterr().out


def test_loop_spec_file_on_the_command_line(dirs, tmp_path, capsys):
    import transformers

    config = transformers.AutoConfig.from_pretrained(dirs["dory"])
    spec = hf.builtin_spec("DoryForCausalLM", config, 3).to_dict()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({**spec, "notes": "my spec"}))
    bad.write_text(json.dumps({**spec, "loop_module": "model.layers.7"}))
    assert main(["info", str(dirs["dory"]), "--json", "--loop-spec", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["loop_spec"]["notes"] == "my spec"
    out = tmp_path / "out"
    assert main(["analyze", str(dirs["dory"]), "--out", str(out), "--loop-spec", str(bad), "--tokens",
                 str(dirs["tokens"]), "--no-probes", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no module 'model.layers.7'" in err and len(err.splitlines()) == 1


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())["models"][0]


@pytest.mark.parametrize("kind", ["hrm", "inkling"])
def test_analyze_saved_directory_from_tokens(dirs, tmp_path, kind):
    K = NATIVE[kind][3]
    out = tmp_path / "out"
    assert main(["analyze", str(dirs[kind]), "--out", str(out), "--tokens", str(dirs["tokens"]), "--no-probes",
                 "--no-progress"]) == 0
    m = _metrics(out)
    assert m["states"] == ["h_emb"] + [f"h^({t})" for t in range(K + 1)] + ["h_out"]
    assert m["blocks"] == ["prelude"] + [f"loop {t + 1}" for t in range(K)] + ["coda"]
    assert len(m["update"]["mean"]) == K + 2 and len(m["lens"]["loss"]["mean"]) == K + 3
    n_rows = np.load(dirs["tokens"]).size  # the lens of h_out recomputes the readout, then the mean over rows
    assert m["lens"]["loss"]["mean"][-1] == approx_f32(m["lens"]["model_loss"]["mean"], n_rows + 64 + 128, layers=2)
    assert m["model"]["n_loops"] == K and m["router"] is None
    assert any("coda lens skipped" in n for n in m["notes"])
    assert (out / "fig1.png").is_file() and (out / "report.md").is_file()


def test_analyze_dory_with_its_tokenizer_probes_and_loops(dirs, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", str(dirs["dory"]), "--out", str(out), "--data", "shakespeare", "--samples", "10",
                 "--seq-len", "16", "--loops", "5", "--no-progress", "--offsets", "0"]) == 0
    m = _metrics(out)
    assert m["model"]["n_loops"] == 5 and len(m["states"]) == 5 + 3
    from meshprobe.analysis.pipeline.schema import METRICS_KEYS, metric_key_paths

    doc = json.loads((out / "metrics.json").read_text())
    assert metric_key_paths(doc) - set(METRICS_KEYS) == set()  # the same keys as for meshprobe's own models
    assert m["probes"]["loop_step"] is not None  # the loop-step probe over the 5 steps
    assert m["probes"]["random_init"]["features"] == ["h^(5)"]
    assert "the model's tokenizer" in m["data"]["source"]


def test_mp_analyze_on_a_directory(dirs):
    import meshprobe as mp

    m = mp.analyze(str(dirs["dory"]), samples=6, seq_len=12, probes=False, progress=False)
    assert m["states"][-2] == "h^(3)" and m["model"]["layout"] == "DoryForCausalLM"
    assert "the model's tokenizer" in m["data"]["source"] and m["name"] == "dory"
    w = hf.load(dirs["hrm"])
    m = mp.analyze(w, _tokens(4, 12), probes=False, progress=False)
    assert m["model"]["n_loops"] == 2 and m["checkpoint"] == str(dirs["hrm"])


def test_analyze_flags_for_hf_dirs_only(dirs, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model": {"layout": "1+1R2+1"}}))
    assert main(["analyze", str(ckpt), "--out", str(tmp_path / "o"), "--loop-spec", "x.json"]) == 2
    assert "--loop-spec applies to transformers model directories only" in capsys.readouterr().err
    assert main(["analyze", str(dirs["dory"]), "--out", str(tmp_path / "o"), "--loops", "2,3"]) == 2
    assert "--loops takes one K for transformers model directories" in capsys.readouterr().err
    assert main(["analyze", str(ckpt), str(dirs["dory"]), "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["analyze", str(dirs["hrm"]), "--out", str(tmp_path / "o"), "--loops", "0"]) == 2
    assert not (tmp_path / "o").exists()


def _plant_remote(root, auto_map=True):
    """A model directory whose modeling file leaves a mark when imported."""
    d = root / ("remote" if auto_map else "unknown")
    d.mkdir()
    mark = root / f"IMPORTED-{d.name}"
    config = {"model_type": "ouro" if auto_map else "not_a_model_type", "architectures": ["OuroForCausalLM"]}
    if auto_map:
        config["auto_map"] = {"AutoConfig": "configuration_ouro.OuroConfig",
                              "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    code = f"open({str(mark)!r}, 'w').write('imported')\n"
    for name in ("modeling_ouro.py", "configuration_ouro.py", "tokenization_ouro.py"):
        (d / name).write_text(code)
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_ouro.T", None]}}))
    return d, mark


@pytest.mark.parametrize("auto_map", [True, False])
def test_remote_code_is_refused_without_the_flag(tmp_path, capsys, auto_map):
    d, mark = _plant_remote(tmp_path, auto_map)
    with pytest.raises(UserError, match="trust_remote_code=True"):
        hf.load(d)
    assert main(["info", str(d)]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "out"
    assert main(["analyze", str(d), "--out", str(out), "--data", "shakespeare"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not mark.exists() and not out.exists()


def test_a_remote_tokenizer_is_refused_too(dirs, tmp_path):
    import shutil

    from meshprobe.hf.loader import load_tokenizer

    d = tmp_path / "dory"
    shutil.copytree(dirs["dory"], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["tok.T", None]}}))
    (d / "tok.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w')\n")
    with pytest.raises(UserError, match="tokenizer maps to remote code"):
        load_tokenizer(d)
    assert main(["analyze", str(d), "--out", str(tmp_path / "out"), "--samples", "4", "--seq-len", "8"]) == 2
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "out").exists()


def test_pickle_weights_are_never_loaded(dirs, tmp_path):
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(dirs["hrm"], d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="no .safetensors weights .*pickle files are never loaded"):
        hf.load(d)


@pytest.mark.slow
def test_remote_code_runs_with_the_flag(tmp_path):
    """The Ouro stand-in as remote code (auto_map + modeling_ouro.py): loaded only with --trust-remote-code, its
    built-in spec applies, --loops reaches the step count the model copied at construction."""
    import os
    import subprocess
    import sys

    d, mark = tmp_path / "ouro", tmp_path / "IMPORTED"
    write_remote_ouro(d, mark)
    np.save(tmp_path / "tokens.npy", _tokens(4, 12, vocab=50).numpy())
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf-home")}
    cmd = [sys.executable, "-m", "meshprobe", "analyze", str(d), "--out", str(tmp_path / "out"), "--tokens",
           str(tmp_path / "tokens.npy"), "--no-probes", "--no-progress", "--loops", "3"]
    with pytest.raises(UserError, match="trust_remote_code=True"):
        hf.load(d)
    assert not mark.exists()
    done = subprocess.run([*cmd, "--trust-remote-code"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert mark.exists()
    m = _metrics(tmp_path / "out")
    assert m["model"]["layout"] == "OuroForCausalLM" and m["model"]["n_loops"] == 3
    assert m["states"] == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h^(3)", "h_out"]
    # Ouro: h_out is the last step's output (a ratio of norms: scale 1)
    assert m["update"]["mean"][-1] == approx_f32(0.0, 64, scale=1.0)
