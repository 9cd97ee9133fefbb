"""The one token resolver (meshprobe.analysis.pipeline.tokens.resolve_tokens) for every kind of model: given
tokens, a meshprobe checkpoint (its val_tokens.npy or its corpus), a task checkpoint, a transformers looped LM."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from meshprobe import build_model, save_checkpoint
from meshprobe.analysis.pipeline.tokens import (TokenRequest, check_same_text, given_tokens, resolve_tokens, task_batch,
                                                tokenizer_identity)
from meshprobe.checkpoint import load_checkpoint
from meshprobe.cli import main
from meshprobe.data import tasks
from meshprobe.errors import UserError

TASK = "task:phop:hops=2,symbols=8,seq_len=12,mix=1"


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """A text checkpoint with a tokenizer and corpus, the same with a bundled val_tokens.npy, a task checkpoint."""
    from meshprobe.data import train_tokenizer

    root = tmp_path_factory.mktemp("resolver")
    corpus = root / "corpus.txt"
    corpus.write_text((Path(__file__).resolve().parents[1] / "meshprobe" / "model.py").read_text() * 2)
    tok = train_tokenizer([corpus.read_text()], vocab_size=300)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(vocab_size=300))
    text = save_checkpoint(model, root / "text", tokenizer=tok, train={"data": str(corpus)})
    bundled = save_checkpoint(model, root / "bundled", tokenizer=tok, train={"data": str(corpus)})
    np.save(bundled / "val_tokens.npy", np.arange(5 * 16, dtype=np.int16).reshape(5, 16) % 300)
    task = save_checkpoint(model, root / "task", task=tasks.parse_task(TASK).entry())
    return {"root": root, "text": text, "bundled": bundled, "task": task, "corpus": corpus}


def test_given_tokens_are_cut_and_checked(kinds):
    model = load_checkpoint(kinds["text"])
    arr = np.arange(6 * 16, dtype=np.uint16).reshape(6, 16) % 300
    tokens, source = resolve_tokens(model, kinds["text"], TokenRequest(arr, samples=4, seq_len=8))
    assert tokens.dtype == torch.long and torch.equal(tokens, torch.from_numpy(arr[:4, :8].astype(np.int64)))
    assert source == "tokens given to analyze_model (rows 0..3, 8 tokens)"
    np.save(kinds["root"] / "t.npy", arr)
    tokens, source = resolve_tokens(model, None, TokenRequest(kinds["root"] / "t.npy"))
    assert tokens.shape == (6, 16) and source == str(kinds["root"] / "t.npy")  # the whole file: its path
    with pytest.raises(UserError, match="samples=7 but"):
        resolve_tokens(model, None, TokenRequest(arr, samples=7))
    with pytest.raises(UserError, match=r"token ids must lie in \[0, 300\)"):
        resolve_tokens(model, None, TokenRequest(arr + 300))
    for bad in (arr.astype(np.float32), arr.astype(str), torch.from_numpy(arr.astype(np.float32))):
        with pytest.raises(UserError, match="must be integers"):
            given_tokens(TokenRequest(bad))


def test_a_checkpoint_reads_its_own_sample_unless_data_is_given(kinds):
    model = load_checkpoint(kinds["bundled"])
    tokens, source = resolve_tokens(model, kinds["bundled"], TokenRequest(samples=3))
    assert torch.equal(tokens, torch.from_numpy(np.load(kinds["bundled"] / "val_tokens.npy")[:3].astype(np.int64)))
    assert "own validation sample" in source
    tokens, source = resolve_tokens(model, kinds["bundled"], TokenRequest(samples=3, seq_len=8, seed=1,
                                                                          data=str(kinds["corpus"])))
    assert tokens.shape == (3, 8) and source == f"validation split of {kinds['corpus']}"
    same, _ = resolve_tokens(load_checkpoint(kinds["text"]), kinds["text"], TokenRequest(samples=3, seq_len=8,
                                                                                         seed=1))
    assert torch.equal(tokens, same)  # the text checkpoint's own corpus is the same file


def test_a_task_checkpoint_gets_its_evaluation_sequences(kinds):
    model = load_checkpoint(kinds["task"])
    tokens, source = resolve_tokens(model, kinds["task"], TokenRequest(samples=5, seed=2))
    want = tasks.eval_set(tasks.parse_task(TASK), 5, seed=2).tokens
    assert torch.equal(tokens, torch.from_numpy(np.asarray(want, dtype=np.int64)))
    assert source == f"evaluation sequences of {tasks.parse_task(TASK).spec_string()} (seed 2)"
    with pytest.raises(UserError, match="trained on task:phop:hops=2.*not data=task:phop:hops=3"):
        task_batch(model, TokenRequest(data=["task:phop:hops=3,symbols=8,seq_len=12,mix=1"]))


def test_a_transformers_model_uses_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import DoryConfig, DoryForCausalLM, PreTrainedTokenizerFast

    from meshprobe import hf

    torch.manual_seed(0)
    DoryForCausalLM(DoryConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, n_input_layers=1, n_output_layers=1, n_recurrent_loops=2,
        sliding_window=8, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["to be or not to be that is the question"] * 5,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    model = hf.load(tmp_path)
    tokens, source = resolve_tokens(model, None, TokenRequest(samples=4, seq_len=10))  # path from the model
    assert tokens.shape == (4, 10) and int(tokens.max()) < 60
    assert source == "validation split of shakespeare (the model's tokenizer)"


# ------------------------------------------------------------------- comparisons across different tokenizers
def _snapshot(root):
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshprobe analyze: error:") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def two_tokenizers(kinds, tmp_path_factory):
    """Two checkpoints whose tokenizers differ (vocab 300 and 400), each with its own val_tokens.npy."""
    from meshprobe.data import train_tokenizer

    root = tmp_path_factory.mktemp("two")
    text = kinds["corpus"].read_text()
    out = {}
    for vocab in (300, 400):
        torch.manual_seed(0)
        out[vocab] = save_checkpoint(build_model(tiny_cfg(vocab_size=vocab)), root / f"v{vocab}",
                                     tokenizer=train_tokenizer([text], vocab_size=vocab),
                                     train={"data": str(kinds["corpus"])})
        np.save(out[vocab] / "val_tokens.npy", np.arange(4 * 16).reshape(4, 16) % 300)
    np.save(root / "t.npy", np.arange(4 * 16).reshape(4, 16) % 300)
    out["tokens"], out["root"] = root / "t.npy", root
    return out


def test_given_ids_across_different_tokenizers_are_refused(two_tokenizers, tmp_path, capsys):
    a, b = two_tokenizers[300], two_tokenizers[400]
    before = _snapshot(two_tokenizers["root"])
    assert main(["analyze", str(a), str(b), "--tokens", str(two_tokenizers["tokens"]), "--out",
                 str(tmp_path / "out")]) == 2
    err = _one_error(capsys)
    assert "different tokenizers (vocab 300 and 400)" in err and "--data SPEC" in err and "--tokens " in err
    assert list(tmp_path.iterdir()) == [] and _snapshot(two_tokenizers["root"]) == before


def test_own_samples_across_different_tokenizers_are_refused(two_tokenizers, tmp_path, capsys):
    """Without a data flag each checkpoint would read its own val_tokens.npy: different text to each."""
    assert main(["analyze", str(two_tokenizers[300]), str(two_tokenizers[400]), "--out", str(tmp_path / "o")]) == 2
    err = _one_error(capsys)
    assert "would each read their own validation text" in err and "--data SPEC" in err
    assert list(tmp_path.iterdir()) == []


def test_different_tokenizers_compare_on_the_same_text(two_tokenizers, kinds, tmp_path):
    out = tmp_path / "o"
    assert main(["analyze", str(two_tokenizers[300]), str(two_tokenizers[400]), "--data", str(kinds["corpus"]),
                 "--out", str(out), "--samples", "4", "--seq-len", "8", "--no-probes", "--no-progress"]) == 0
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert [m["model"]["vocab_size"] for m in models] == [300, 400]
    assert {m["data"]["source"] for m in models} == {f"validation split of {kinds['corpus']}"}


def test_tokenizer_identity_is_the_file_content_or_the_vocabulary(two_tokenizers, kinds, tmp_path):
    cfg = {"model": {"vocab_size": 300}}
    assert tokenizer_identity(kinds["text"], cfg) == tokenizer_identity(kinds["bundled"], cfg)  # same file, 2 copies
    assert tokenizer_identity(two_tokenizers[300], cfg) != tokenizer_identity(two_tokenizers[400], cfg)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert tokenizer_identity(tmp_path / "a", cfg) == tokenizer_identity(tmp_path / "b", cfg)
    assert tokenizer_identity(tmp_path / "a", cfg) != tokenizer_identity(tmp_path / "b", {"model": {"vocab_size": 9}})
    check_same_text([two_tokenizers[300], two_tokenizers[400]], [cfg, {"model": {"vocab_size": 400}}],
                    data="shakespeare")  # the same text through each tokenizer: no error


def _dory_dir(path, tokenizer_text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import DoryConfig, DoryForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    DoryForCausalLM(DoryConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, n_input_layers=1, n_output_layers=1, n_recurrent_loops=2,
        sliding_window=8, max_position_embeddings=64)).save_pretrained(path)
    if tokenizer_text is None:
        return path
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([tokenizer_text] * 5, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return path


def test_transformers_directories_with_different_tokenizers(tmp_path, capsys):
    """Given ids are refused; without a data flag both read shakespeare through their own tokenizers."""
    a = _dory_dir(tmp_path / "a", "to be or not to be that is the question")
    b = _dory_dir(tmp_path / "b", "whether tis nobler in the mind to suffer the slings and arrows")
    np.save(tmp_path / "t.npy", np.arange(4 * 16).reshape(4, 16) % 60)
    capsys.readouterr()  # save_pretrained's progress bars
    before = _snapshot(tmp_path)
    assert main(["analyze", str(a), str(b), "--tokens", str(tmp_path / "t.npy"), "--out", str(tmp_path / "o")]) == 2
    err = _one_error(capsys)
    assert "different tokenizers (different tokenizer files)" in err and "--data SPEC" in err
    assert _snapshot(tmp_path) == before
    assert main(["analyze", str(a), str(b), "--out", str(tmp_path / "o"), "--samples", "4", "--seq-len", "8",
                 "--no-probes", "--no-progress"]) == 0
    models = json.loads((tmp_path / "o" / "metrics.json").read_text())["models"]
    assert {m["data"]["source"] for m in models} == {"validation split of shakespeare (the model's tokenizer)"}

