"""Tests for meshprobe.data.tasks: generators against brute-force definitions, masking, latents, specs, scoring."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meshprobe.data import tasks
from meshprobe.errors import UserError


# ------------------------------------------------------------ brute force, written as the definitions read (1-based)
def brute_phop(x0: list[int], p: int) -> list[int | None]:
    """hop_p(i) for i = 1..n from the definition, literally, with 1-based positions."""
    n = len(x0)
    x = [None] + list(x0)  # x[1..n]

    def step(i):
        earlier = [j for j in range(1, i) if x[j] == x[i]]
        return max(earlier) + 1 if earlier else None

    out = []
    for i in range(1, n + 1):
        k = i
        for _ in range(p):
            k = step(k)
            if k is None:
                break
        out.append(None if k is None else x[k])
    return out


def brute_modsum(x: list[int], p: int, v: int) -> list[int | None]:
    return [sum(x[i - p + 1:i + 1]) % v if i >= p - 1 else None for i in range(len(x))]


def _none_to(values, fill):
    return [fill if v is None else v for v in values]


@pytest.mark.parametrize("v,n,hops", [(2, 12, 4), (4, 20, 3), (8, 32, 3), (16, 64, 2)])
def test_phop_latents_match_brute_force(v, n, hops):
    rng = np.random.default_rng(v * 100 + n)
    x = rng.integers(0, v, size=(25, n))
    lat = tasks.phop_latents(x, hops, v)
    assert lat.shape == (25, hops, n) and lat.dtype == np.int64
    defined = 0
    for b in range(len(x)):
        for t in range(1, hops + 1):
            expect = _none_to(brute_phop(x[b].tolist(), t), tasks.UNDEFINED)
            assert lat[b, t - 1].tolist() == expect, (b, t)
            defined += sum(e >= 0 for e in expect)
    assert defined > 0


def test_phop_handcrafted():
    # 1-based: x = a b a b c a ; prev(3)=1 -> step 2 -> hop1(3)=b ; prev(2) undefined -> hop2(3) undefined
    a, b, c = 0, 1, 2
    lat = tasks.phop_latents(np.array([[a, b, a, b, c, a]]), 2, 3)[0]
    assert lat[0].tolist() == [-1, -1, b, a, -1, b]  # hop1(6): prev(6)=3, step=4, x_4=b
    assert lat[1].tolist() == [-1, -1, -1, b, -1, a]  # hop2(6): step(4): prev(4)=2 -> 3, x_3=a
    # x_{i-1} = x_i: step(i) = i, so every hop at i returns x_i (the definition taken literally)
    lat = tasks.phop_latents(np.array([[a, a, a]]), 3, 2)[0]
    assert lat[:, 1].tolist() == [a, a, a] and lat[:, 2].tolist() == [a, a, a]
    assert lat[:, 0].tolist() == [-1, -1, -1]


def test_modsum_latents_match_brute_force():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=(10, 17))
    lat = tasks.modsum_latents(x, 4, 5)
    for b in range(10):
        for t in range(1, 5):
            assert lat[b, t - 1].tolist() == _none_to(brute_modsum(x[b].tolist(), t, 5), -1)


# ---------------------------------------------------------------------------------------- batches + masking
@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_fixed_hops_batch_targets_and_masking(name):
    spec = tasks.TaskSpec(name=name, hops=3, symbols=4, seq_len=24)
    batch = tasks.train_batch(spec, 16, step=5, seed=3)
    assert batch.offset == 0 and spec.prefix == [] and spec.vocab_size == 4 and spec.n_ctx == 24
    assert batch.tokens.shape == batch.targets.shape == (16, 24)
    assert batch.latents.shape == (16, 3, 24) and (batch.hops == 3).all()
    brute = brute_phop if name == "phop" else (lambda x, p: brute_modsum(x, p, 4))
    for b in range(16):
        assert batch.targets[b].tolist() == _none_to(brute(batch.tokens[b].tolist(), 3), tasks.IGNORE)
    # latent p is the target wherever defined; the loss ignores exactly the undefined positions
    assert ((batch.targets == tasks.IGNORE) == (batch.latents[:, 2] == tasks.UNDEFINED)).all()
    assert ((batch.targets >= 0) & (batch.targets < 4) | (batch.targets == tasks.IGNORE)).all()
    assert (batch.targets == tasks.IGNORE).any() and (batch.targets >= 0).any()
    logits = torch.randn(16, 24, 4, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(batch.targets).flatten())
    loss.backward()  # ignored positions get no gradient
    assert (logits.grad[torch.as_tensor(batch.targets) == tasks.IGNORE] == 0).all()


def test_mixed_hops_prefix_targets_latents():
    spec = tasks.parse_task("task:phop:hops=3,symbols=8,seq_len=32,mix=1")
    assert spec.train_hops == [1, 2, 3] and spec.prefix == [10] and spec.vocab_size == 11 and spec.n_ctx == 33
    assert [spec.prefix_for(p) for p in (1, 2, 3)] == [[8], [9], [10]]
    batch = tasks.train_batch(spec, 64, step=0, seed=0)
    assert batch.offset == 1 and batch.tokens.shape == (64, 33) and batch.latents.shape == (64, 3, 33)
    assert set(batch.hops.tolist()) == {1, 2, 3}
    assert (batch.tokens[:, 0] == 8 + batch.hops - 1).all()
    assert (batch.targets[:, 0] == tasks.IGNORE).all() and (batch.latents[:, :, 0] == tasks.UNDEFINED).all()
    sym = batch.symbols
    assert sym.shape == (64, 32) and sym.max() < 8
    for b in range(64):
        p = int(batch.hops[b])
        assert batch.targets[b, 1:].tolist() == _none_to(brute_phop(sym[b].tolist(), p), tasks.IGNORE)
        for t in (1, 2, 3):  # all latents are recorded, whatever p the sequence asks for
            assert batch.latents[b, t - 1, 1:].tolist() == _none_to(brute_phop(sym[b].tolist(), t), -1)


def test_determinism_resume_and_rank_split():
    spec = tasks.TaskSpec(hops=2, mix=True)
    a, b = tasks.train_batch(spec, 8, 7, 1), tasks.train_batch(spec, 8, 7, 1)
    assert (a.tokens == b.tokens).all() and (a.hops == b.hops).all()
    assert not (tasks.train_batch(spec, 8, 8, 1).tokens == a.tokens).all()
    assert not (tasks.train_batch(spec, 8, 7, 2).tokens == a.tokens).all()
    halves = [tasks.train_batch(spec, 8, 7, 1, rank=r, world_size=2) for r in (0, 1)]
    assert (np.concatenate([h.tokens for h in halves]) == a.tokens).all()
    it = tasks.batches(spec, 8, seed=1, start_step=6)
    next(it)
    assert (next(it).tokens == a.tokens).all()


def test_eval_set_fixed_and_apart_from_training():
    spec = tasks.TaskSpec(hops=2, mix=True)
    e = tasks.eval_set(spec, 32)
    assert (e.hops == 2).all() and (e.tokens[:, 0] == spec.prefix[0]).all()
    assert (tasks.eval_set(spec, 32).tokens == e.tokens).all()
    assert (tasks.eval_set(spec, 32, hops=1).symbols == e.symbols).all()  # same symbols, other question
    assert (tasks.eval_set(spec, 32, hops=1).tokens[:, 0] == spec.prefix_for(1)[0]).all()
    assert not (tasks.eval_set(spec, 32, seed=1).tokens == e.tokens).all()
    assert not any((tasks.train_batch(spec, 32, s, 0).symbols == e.symbols).all() for s in range(3))
    with pytest.raises(UserError, match="cannot ask for 3 hops"):
        tasks.eval_set(spec, 4, hops=3)
    with pytest.raises(UserError, match="cannot ask for 1 hops"):
        tasks.eval_set(tasks.TaskSpec(hops=2), 4, hops=1)


# ----------------------------------------------------------------------------------------------- spec strings
def test_parse_task_defaults_and_round_trip():
    spec = tasks.parse_task("task:phop")
    assert spec == tasks.TaskSpec("phop", hops=2, symbols=8, seq_len=32, mix=False)
    assert tasks.is_task_spec("task:modsum") and not tasks.is_task_spec("shakespeare")
    for s in ["task:phop:hops=3,symbols=16,seq_len=64,mix=1", "task:modsum:hops=1", "task:phop: hops = 2 , mix=0"]:
        spec = tasks.parse_task(s)
        assert tasks.parse_task(spec.spec_string()) == spec
        assert tasks.task_from_entry(spec.entry()) == spec
    entry = tasks.parse_task("task:phop:hops=2,mix=1").entry()
    assert entry == {"name": "phop", "hops": 2, "symbols": 8, "seq_len": 32, "prefix": [9], "train_hops": [1, 2]}
    assert tasks.task_from_entry({"name": "phop", "hops": 2, "symbols": 8, "seq_len": 32}).mix is False
    assert tasks.task_from_entry({"name": "phop", "hops": 1, "symbols": 8, "seq_len": 32, "prefix": [8]}).mix


@pytest.mark.parametrize("bad,match", [
    ("phop", "must start with"), ("task:nope", "unknown task"), ("task:phop:hops", "bad parameter"),
    ("task:phop:depth=2", "bad parameter"), ("task:phop:hops=x", "must be an integer"),
    ("task:phop:hops=0", "hops must be"), ("task:phop:symbols=1", "symbols must be"),
    ("task:phop:mix=2", "mix must be"), ("task:phop:hops=2,hops=3", "given twice"),
])
def test_parse_task_errors(bad, match):
    with pytest.raises(UserError, match=match):
        tasks.parse_task(bad)


def test_entry_prefix_mismatch_is_an_error():
    with pytest.raises(UserError, match="does not match"):
        tasks.task_from_entry({"name": "phop", "hops": 2, "symbols": 8, "seq_len": 32, "prefix": [3]})


# --------------------------------------------------------------------------------------------------- scoring
def test_task_accuracy_uses_first_v_logits_and_defined_positions():
    targets = torch.tensor([[tasks.IGNORE, 1, 2, tasks.IGNORE], [0, 3, tasks.IGNORE, 1]])
    logits = torch.zeros(2, 4, 6)
    logits[..., 5] = 100.0  # a prefix token's logit must never count as a prediction
    for (b, i), t in np.ndenumerate(targets.numpy()):
        if t >= 0:
            logits[b, i, t] = 1.0
    logits[1, 3, 2] = 2.0  # one wrong answer
    logits[0, 0, 0] = 5.0  # ignored positions do not matter
    assert tasks.task_correct(logits, targets, 4) == (4, 5)
    assert tasks.task_accuracy(logits, targets, 4) == pytest.approx(0.8)
    assert np.isnan(tasks.task_accuracy(logits, torch.full((2, 4), tasks.IGNORE), 4))
    with pytest.raises(UserError):
        tasks.task_accuracy(logits[:, :3], targets, 4)


def test_perfect_oracle_scores_one_on_eval_set():
    spec = tasks.TaskSpec(hops=2, symbols=8, seq_len=32, mix=True)
    e = tasks.eval_set(spec, 16)
    logits = torch.nn.functional.one_hot(torch.as_tensor(e.latents[:, 1].clip(0)), spec.vocab_size).float()
    assert tasks.task_accuracy(logits, e.targets, spec.symbols) == 1.0


# ------------------------------------------------------------------------------------------- inspection aids
def test_shortcut_accuracies_and_describe():
    spec = tasks.TaskSpec(hops=2, symbols=8, seq_len=32, mix=True)
    e = tasks.eval_set(spec, 500)
    acc = tasks.shortcut_accuracies(e)
    assert acc["hop_2"] == 1.0 and 0.0 < acc["hop_1"] < 1.0 and 0.0 < acc["x_i"] < 1.0
    mask = e.targets >= 0
    assert acc["x_i"] == pytest.approx(float((e.tokens == e.targets)[mask].mean()))
    assert 1 / 8 <= acc["majority"] < 0.5
    text = tasks.describe(spec, n_examples=1)
    assert "task:phop:hops=2,symbols=8,seq_len=32,mix=1" in text and "latent 2" in text and "x_i" in text
    assert " ".join(f"{v:>2d}" for v in e.tokens[0]) in text  # the first evaluation sequence, verbatim


def test_model_consumes_task_batches():
    """A model sized by the spec (vocab_size, n_ctx) takes the tokens; the masked loss is finite and trains."""
    from meshprobe import ModelConfig, build_model

    spec = tasks.parse_task("task:phop:hops=2,symbols=8,seq_len=16,mix=1")
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_heads=4, vocab_size=spec.vocab_size, n_ctx=spec.n_ctx,
                                    layout="1+1R2+1", variant="mesh"))
    batch = tasks.train_batch(spec, 8, step=0, seed=0)
    logits = model(torch.as_tensor(batch.tokens))
    assert logits.shape == (8, spec.n_ctx, spec.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(batch.targets).flatten())
    assert torch.isfinite(loss)
    loss.backward()
    acc = tasks.task_accuracy(logits.detach(), batch.targets, spec.symbols)
    assert 0.0 <= acc <= 1.0
