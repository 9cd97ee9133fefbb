"""Tests for meshprobe.analysis.probes (streaming ridge probes, control tasks, probe suite)."""
import math

import pytest
import torch
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler

from meshprobe.analysis.probes import (
    TOKEN_TASKS,
    MultiTaskRidgeProbe,
    ProbeSuite,
    StreamingRidgeProbe,
    TokenLabelMap,
    control_labels,
    token_task_labels,
    token_task_rows,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _planted(n, d, C, g, noise=0.3):
    """Labels linearly decodable from X: class means on random directions + noise."""
    y = torch.randint(0, C, (n,), generator=g)
    centers = 3.0 * torch.randn(C, d, generator=g)
    X = centers[y] + noise * torch.randn(n, d, generator=g) + 5.0  # non-zero mean on purpose
    return X, y


# ---------------------------------------------------------------- StreamingRidgeProbe
def test_probe_recovers_planted_feature():
    g = _gen(0)
    X, y = _planted(3000, 32, 10, g)
    p = StreamingRidgeProbe(32, 10).partial_fit(X[:2000], y[:2000]).finalize()
    assert p.score(X[2000:], y[2000:]) > 0.98


def test_probe_at_chance_on_noise():
    g = _gen(1)
    C = 5
    X = torch.randn(6000, 16, generator=g)
    y = torch.randint(0, C, (6000,), generator=g)
    p = StreamingRidgeProbe(16, C).partial_fit(X[:4000], y[:4000])
    acc = p.score(X[4000:], y[4000:])
    assert abs(acc - 1 / C) < 0.04


@pytest.mark.parametrize("l2", [1e-3, 1e-1, 3.0])
def test_probe_agrees_with_sklearn_ridge_classifier(l2):
    g = _gen(2)
    n, d, C = 1500, 24, 7
    X, y = _planted(n, d, C, g, noise=4.0)  # noisy enough that the ridge strength matters
    # standardized with the training rows' statistics, so the probe's own standardization is the identity
    Xs = torch.from_numpy(StandardScaler().fit(X[:1000].double().numpy()).transform(X.double().numpy()))
    p = StreamingRidgeProbe(d, C, l2=l2)
    for i in range(0, 1000, 137):
        p.partial_fit(Xs[i:min(i + 137, 1000)], y[i:min(i + 137, 1000)])
    p.finalize()
    assert p.alpha_ == pytest.approx(l2 * 1000, rel=1e-3)  # relative l2: alpha = l2 * trace / d = l2 * n
    sk = RidgeClassifier(alpha=p.alpha_, fit_intercept=True, solver="cholesky").fit(Xs[:1000].numpy(),
                                                                                   y[:1000].numpy())
    ours = p.predict(Xs[1000:]).numpy()
    theirs = sk.predict(Xs[1000:].numpy())
    agree = (ours == theirs).mean()
    assert agree >= 0.99
    # and the fitted weights are the same up to sklearn's +-1 target coding (W_sk = 2 W)
    assert torch.allclose(2 * p.coef_, torch.from_numpy(sk.coef_.T).double(), atol=1e-6, rtol=1e-4)


def test_probe_absolute_l2_matches_sklearn_on_raw_features():
    g = _gen(3)
    X, y = _planted(800, 12, 4, g, noise=3.0)
    p = StreamingRidgeProbe(12, 4, l2=25.0, l2_relative=False, standardize=False).partial_fit(X[:600], y[:600])
    sk = RidgeClassifier(alpha=25.0).fit(X[:600].double().numpy(), y[:600].numpy())
    assert (p.predict(X[600:]).numpy() == sk.predict(X[600:].double().numpy())).mean() >= 0.99
    assert torch.allclose(2 * p.coef_, torch.from_numpy(sk.coef_.T), atol=1e-6, rtol=1e-4)


def test_chunked_partial_fit_equals_one_shot_and_constant_memory():
    g = _gen(4)
    X, y = _planted(2000, 20, 6, g)
    one = StreamingRidgeProbe(20, 6).partial_fit(X, y).finalize()
    many = StreamingRidgeProbe(20, 6)
    many.partial_fit(X[:10], y[:10])
    size = many.nbytes
    for i in range(10, 2000, 50):
        many.partial_fit(X[i:i + 50], y[i:i + 50])
        assert many.nbytes == size  # state does not grow with the number of calls / rows
    many.finalize()
    assert torch.allclose(one.coef_, many.coef_, atol=1e-9, rtol=1e-7)
    assert torch.allclose(one.intercept_, many.intercept_, atol=1e-9, rtol=1e-7)
    assert torch.equal(one.predict(X), many.predict(X))


def test_probe_ignores_negative_labels_and_never_predicts_unseen_classes():
    g = _gen(5)
    X, y = _planted(1000, 8, 3, g)
    y2 = y.clone()
    y2[::7] = -1
    p = StreamingRidgeProbe(8, 10).partial_fit(X, y2)  # classes 3..9 never seen
    ref = StreamingRidgeProbe(8, 10).partial_fit(X[y2 >= 0], y2[y2 >= 0])
    assert torch.allclose(p.coef_, ref.coef_)
    pred = p.predict(torch.randn(500, 8, generator=g) * 100)
    assert int(pred.max()) <= 2
    with pytest.raises(ValueError):
        StreamingRidgeProbe(8, 3).partial_fit(X, torch.full((1000,), 3))


def test_multitask_probe_equals_separate_probes():
    g = _gen(6)
    X, y = _planted(1200, 16, 5, g)
    z = (y + torch.randint(0, 2, y.shape, generator=g)) % 3
    mt = MultiTaskRidgeProbe(16, {"a": 5, "b": 3}).partial_fit(X, {"a": y, "b": z}).finalize()
    pa = StreamingRidgeProbe(16, 5).partial_fit(X, y)
    pb = StreamingRidgeProbe(16, 3).partial_fit(X, z)
    preds = mt.predict(X)
    assert torch.equal(preds["a"], pa.predict(X)) and torch.equal(preds["b"], pb.predict(X))


# ---------------------------------------------------------------- control tasks and labels
def test_control_labels_deterministic_function_of_type():
    types = torch.tensor([5, 9, 5, 1000, 9, 5])
    a = control_labels(types, 7, seed=3)
    assert a.dtype == torch.long and a.shape == types.shape
    assert a[0] == a[2] == a[5] and a[1] == a[4]
    assert torch.equal(a, control_labels(types, 7, seed=3))
    assert torch.equal(control_labels(types[:2], 7, seed=3), a[:2])  # batch independent
    many = control_labels(torch.arange(20000), 8, seed=0)
    frac = torch.bincount(many, minlength=8).double() / 20000
    assert (frac - 1 / 8).abs().max() < 0.01  # ~uniform over the label set
    assert not torch.equal(many, control_labels(torch.arange(20000), 8, seed=1))
    # drawn from a given label distribution (Hewitt & Liang: the real task's empirical distribution)
    probs = torch.tensor([0.6, 0.0, 0.3, 0.1])
    skew = control_labels(torch.arange(20000), 4, seed=0, probs=probs)
    frac = torch.bincount(skew, minlength=4).double() / 20000
    assert (frac - probs.double()).abs().max() < 0.015 and frac[1] == 0


def test_token_label_map_and_tasks():
    counts = torch.tensor([0, 50, 10, 30, 30, 1, 0])
    lm = TokenLabelMap.from_counts(counts, max_classes=4)
    assert lm.n_classes == 4 and lm.other == 3
    # top-3: id1 (50), id3 (30, smaller id wins the tie), id4 (30)
    assert lm(torch.tensor([1, 3, 4, 2, 5, 0, 99])).tolist() == [0, 1, 2, 3, 3, 3, 3]
    small = TokenLabelMap.from_counts(counts, max_classes=100)  # fewer seen types than classes
    assert small.n_classes == 6
    tok = torch.tensor([1, 2, 3, 4, 5, 1, 2, 3])
    rows, labs = token_task_labels(tok, small, control_seed=0)
    assert rows.tolist() == list(range(2, 7)) and torch.equal(rows, token_task_rows(8))
    assert torch.equal(labs["current"], small(tok[2:7]))
    assert torch.equal(labs["prev1"], small(tok[1:6]))
    assert torch.equal(labs["prev2"], small(tok[0:5]))
    assert torch.equal(labs["next"], small(tok[3:8]))
    for t, off in TOKEN_TASKS.items():
        # default "target" control: function of the target token's type, one map per task
        ref = control_labels(tok[2 + off:7 + off], 6, 0, salt=t, probs=small.class_probs)
        assert torch.equal(labs[t + "/control"], ref)
    _, labc = token_task_labels(tok, small, control_source="current")
    assert torch.equal(labc["next/control"], control_labels(tok[2:7], 6, 0, salt="next", probs=small.class_probs))
    with pytest.raises(ValueError):
        token_task_labels(tok, small, control_source="other")
    # class distribution implied by the counts (OTHER = ids 5 and the unseen ones)
    assert torch.allclose(lm.class_probs, torch.tensor([50, 30, 30, 11], dtype=torch.float64) / 121)
    assert token_task_rows(3).numel() == 0


# ---------------------------------------------------------------- ProbeSuite
def _toy_corpus(n_seq, seq_len, V, d, g):
    """Sequences of random tokens; state "emb" = embedding of the current token (carries current id only),
    "mix" = emb(x_t) + emb2(x_{t-1}) (carries current and previous), "noise" = random, plus loop states."""
    E = torch.randn(V, d, generator=g)
    E2 = torch.randn(V, d, generator=g)
    loop_dirs = 4.0 * torch.randn(3, d, generator=g)
    data = []
    for _ in range(n_seq):
        tok = torch.randint(0, V, (seq_len,), generator=g)
        emb = E[tok] + 0.05 * torch.randn(seq_len, d, generator=g)
        prev = torch.cat([torch.zeros(1, d), E2[tok[:-1]]])
        states = {"emb": emb, "mix": emb + prev, "noise": torch.randn(seq_len, d, generator=g)}
        for t in range(3):
            states[f"h{t}"] = emb + loop_dirs[t] + 0.5 * torch.randn(seq_len, d, generator=g)
        data.append((tok, states))
    return data


@pytest.fixture(scope="module")
def toy():
    g = _gen(7)
    V, d = 24, 64
    data = _toy_corpus(160, 40, V, d, g)
    lm = TokenLabelMap.from_tokens([t for t, _ in data], vocab_size=V, max_classes=16)
    return data, lm


def _run_suite(data, lm, **kw):
    suite = ProbeSuite(lm, loop_states={"h0": 0, "h1": 1, "h2": 2}, test_fraction=0.25, **kw)
    for i, (tok, st) in enumerate(data):
        suite.update(tok, st, seq_id=i)
    suite.finalize()
    return suite


def test_probe_suite_end_to_end(toy):
    data, lm = toy
    suite = _run_suite(data, lm)
    assert suite.n_train_seqs + suite.n_test_seqs == len(data) and 20 < suite.n_test_seqs < 70
    res = suite.results()  # capped test sample (cap 8192 tokens > all test tokens here)
    assert set(res) == {"emb", "mix", "noise", "h0", "h1", "h2", "loops"}
    assert set(res["emb"]) == set(TOKEN_TASKS) and set(res["loops"]) == {"loop_index"}
    e, m, z = res["emb"], res["mix"], res["noise"]
    assert e["current"]["acc"] > 0.99 and m["current"]["acc"] > 0.95
    assert m["prev1"]["acc"] > 0.9
    assert e["prev1"]["acc"] < e["prev1"]["chance"] + 0.1  # emb carries no info about x_{t-1}
    assert e["next"]["acc"] < e["next"]["chance"] + 0.1
    for task in TOKEN_TASKS:  # random features: at chance, and selectivity near 0
        assert z[task]["acc"] < z[task]["chance"] + 0.08
        assert z[task]["control_acc"] < z[task]["control_chance"] + 0.08
        assert z[task]["selectivity"] == pytest.approx(z[task]["acc"] - z[task]["control_acc"])
        assert abs(z[task]["selectivity_vs_chance"]) < 0.06
    # controls (random map of the target type): need the same information as the real task
    assert e["current"]["control_acc"] > 0.9 and m["prev1"]["control_acc"] > 0.9
    assert e["prev1"]["control_acc"] < e["prev1"]["control_chance"] + 0.1
    assert res["loops"]["loop_index"]["acc"] > 0.95 and res["loops"]["loop_index"]["chance"] < 0.4
    assert res["loops"]["loop_index"]["n_train"] == 3 * res["emb"]["current"]["n_train"]
    n_test_rows = sum(len(t) - 3 for i, (t, _) in enumerate(data) if suite.is_test(i))
    assert e["current"]["n_test"] == n_test_rows

    # exact second pass gives identical numbers when the cap kept every test sequence
    for i, (tok, st) in enumerate(data):
        suite.evaluate(tok, st, seq_id=i)
    res2 = suite.results()
    for s in res:
        for t in res[s]:
            for k in ("acc", "control_acc", "chance", "n_test"):
                assert res2[s][t][k] == pytest.approx(res[s][t][k]), (s, t, k)


def test_probe_suite_cap_is_order_independent_and_bounded(toy):
    data, lm = toy
    a = _run_suite(data, lm, test_cap_tokens=300)
    b = ProbeSuite(lm, loop_states={"h0": 0, "h1": 1, "h2": 2}, test_fraction=0.25, test_cap_tokens=300)
    for i in reversed(range(len(data))):
        b.update(*data[i], seq_id=i)
    b.finalize()
    assert sorted(a._res_data) == sorted(b._res_data)
    assert 0 < a._res_tokens <= 300 and a._res_tokens > 300 - 40
    ra, rb = a.results(), b.results()
    assert ra["emb"]["current"]["n_test"] == a._res_tokens
    assert ra["mix"]["prev1"]["acc"] == pytest.approx(rb["mix"]["prev1"]["acc"], abs=1e-12)


def test_probe_suite_memory_does_not_grow(toy):
    data, lm = toy
    suite = ProbeSuite(lm, loop_states={"h0": 0, "h1": 1, "h2": 2}, test_cap_tokens=200)
    sizes = []
    for rep in range(3):
        for i, (tok, st) in enumerate(data[:30]):
            suite.update(tok, st, seq_id=rep * 30 + i)
        sizes.append(suite.nbytes)
    assert sizes[0] == sizes[1] == sizes[2]


def test_probe_suite_split_and_errors(toy):
    data, lm = toy
    suite = ProbeSuite(lm, test_fraction=0.5, split_seed=3)
    flags = [suite.is_test(i) for i in range(2000)]
    assert abs(sum(flags) / 2000 - 0.5) < 0.05
    assert flags == [ProbeSuite(lm, test_fraction=0.5, split_seed=3).is_test(i) for i in range(2000)]
    tok, st = data[0]
    assert suite.update(tok, st, seq_id=0, split="train") == "train"
    with pytest.raises(ValueError):
        suite.update(tok, {"emb": st["emb"][:-1]}, seq_id=1)
    with pytest.raises(ValueError):
        suite.update(tok, st, seq_id=1, split="val")
    suite.finalize()
    with pytest.raises(RuntimeError):
        suite.update(tok, st, seq_id=2)
    assert not suite.evaluate(tok, st, seq_id=0, split="train")
    r = suite.results()
    assert math.isnan(r["emb"]["current"]["acc"])  # no test data at all


def test_probe_suite_loop_only_and_no_control(toy):
    data, lm = toy
    suite = ProbeSuite(lm, tasks={}, loop_states={"h0": 0, "h1": 1, "h2": 2}, control=False)
    for i, (tok, st) in enumerate(data[:40]):
        suite.update(tok, st, seq_id=i)
    res = suite.results()
    assert set(res) == {"loops"}
    r = res["loops"]["loop_index"]
    assert r["acc"] > 0.95 and math.isnan(r["control_acc"]) and math.isnan(r["selectivity"])
