"""The one token resolver (meshprobe.analysis.pipeline.tokens.resolve_tokens) for every kind of model: given
tokens, a meshprobe checkpoint (its val_tokens.npy or its corpus), a task checkpoint, a transformers looped LM."""
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from meshprobe import build_model, save_checkpoint
from meshprobe.analysis.pipeline.tokens import TokenRequest, given_tokens, resolve_tokens, task_batch
from meshprobe.checkpoint import load_checkpoint
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
    with pytest.raises(UserError, match="must be integers"):
        given_tokens(TokenRequest(arr.astype(np.float32)))


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
