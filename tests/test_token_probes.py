"""Tests for the token-information probes, the loop-step probe and their statistics helpers
(meshprobe.analysis.probes.tokens / loop_probes / softmax / retrieval / stats)."""
import math

import numpy as np
import pytest
import torch

from meshprobe.analysis import token_probe
from meshprobe.analysis.probes.loops import LOOP_FEATURES, loop_step_probe
from meshprobe.analysis.probes.retrieval import RidgeStats, retrieval_ranks
from meshprobe.analysis.probes.softmax import fit_softmax, fit_softmax_cv, fit_softmax_many
from meshprobe.analysis.stats import (bootstrap_ratio_ci, is_test_sequence, sample_disjoint_windows,
                                      shared_ngram_fraction, shares_ngram)
from meshprobe.analysis.probes.tokens import TokenProbePlan, token_probe_increment


def _zipf_tokens(g, N, S, V, a=1.0):
    p = 1.0 / torch.arange(1, V + 1).double() ** a
    return torch.multinomial(p / p.sum(), N * S, replacement=True, generator=g).reshape(N, S)


def _synthetic(seed, N=300, S=64, V=300, d=96):
    """The synthetic check of the probing notes: h = E1[x_i] + E2[x_{i-1}] + 0.5 E3[x_{i-4}] + 0.3 noise, Zipf tokens."""
    g = torch.Generator().manual_seed(seed)
    tok = _zipf_tokens(g, N, S, V)
    E1, E2, E3 = (torch.randn(V, d, generator=g) for _ in range(3))
    h = E1[tok].clone()
    h[:, 1:] += E2[tok[:, :-1]]
    h[:, 4:] += 0.5 * E3[tok[:, :-4]]
    h += 0.3 * torch.randn(N, S, d, generator=g)
    return h, tok, E1


# ------------------------------------------------------------------------------------------- the external check
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_check(seed):
    h, tok, E1 = _synthetic(seed)
    for k in (0, -1, -4, -2, -3, 1):
        r = token_probe(h, tok, k, max_classes=32, seed=seed)
        assert r["chance"] == pytest.approx(1 / 32) and r["classes"] == 32
        lo, hi = r["ci"]
        assert lo <= r["accuracy"] <= hi and hi - lo < 0.2
        if k in (0, -1, -4):
            assert r["accuracy"] >= 0.8, (k, r["accuracy"])
            assert r["ce_gain"] > 2.0
        else:
            assert abs(r["accuracy"] - r["chance"]) < 0.03, (k, r["accuracy"])
            assert r["ce_gain"] < 0.1
    r0 = token_probe(h, tok, 0, max_classes=32, seed=seed, embedding=E1)
    assert r0["retrieval_top1"] >= 0.95 and r0["retrieval_top5"] >= r0["retrieval_top1"]
    assert r0["retrieval_code"] == "embedding" and r0["retrieval_vocab"] == 300
    assert r0["r2_ci"][0] <= r0["r2"] <= r0["r2_ci"][1]


def test_return_keys_determinism_and_balance():
    h, tok, _ = _synthetic(3, N=120, S=32)
    r = token_probe(h, tok, -1, max_classes=16, seed=5)
    for key in ("accuracy", "chance", "ci", "r2", "retrieval_top1", "retrieval_top5", "ce", "prior_ce", "ce_gain",
                "n_train", "n_test", "classes", "baseline"):
        assert key in r
    assert r == token_probe(h, tok, -1, max_classes=16, seed=5)
    assert r["prior_ce"] == pytest.approx(math.log(r["classes"]))  # balanced training rows: uniform prior
    assert r["n_train"] == r["classes"] * r["n_train_per_class"] and r["n_test"] == r["classes"] * r["n_test_per_class"]
    assert r["retrieval_code"] == "gaussian"


def test_plan_rows_balanced_split_by_sequence_and_from_the_most_frequent_types():
    g = torch.Generator().manual_seed(0)
    tok = _zipf_tokens(g, 80, 40, 50)
    plan = TokenProbePlan(tok, [-2, 0, 1], max_classes=8, seed=1, max_train_per_class=20)
    for k, r in plan.by_offset.items():
        tr, te = plan.seq_of(r.train), plan.seq_of(r.test)
        assert not (set(tr.tolist()) & set(te.tolist()))
        assert plan.is_test[te].all() and not plan.is_test[tr].any()
        assert torch.bincount(r.train_y).unique().numel() == 1 and torch.bincount(r.test_y).unique().numel() == 1
        assert len(r.train) == 8 * 20
        # the target of every row is its class's type
        flat = torch.from_numpy(plan.rows[r.train.numpy()])
        assert torch.equal(tok[flat // 40, flat % 40 + k], r.classes[r.train_y])
        counts = torch.bincount(tok[~plan.is_test].reshape(-1), minlength=50)
        assert counts[r.classes].min() >= counts[counts.argsort(descending=True)[8]]
    ignore = torch.arange(80) % 3 == 0
    plan2 = TokenProbePlan(tok, [-1], max_classes=8, seed=1, ignore=ignore)
    used = plan2.seq_of(torch.arange(len(plan2.rows)))
    assert not ignore[used].any() and not plan2.is_test[ignore].any() and not plan2.is_train[ignore].any()


def test_streaming_accumulator_matches_whole_tensor_call_in_any_batch_order():
    h, tok, _ = _synthetic(4, N=100, S=32, V=80, d=24)
    plan = TokenProbePlan(tok, [-1], max_classes=10, seed=2)
    acc = plan.accumulator()
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    for s in range(0, 100, 7):
        ids = order[s:s + 7]
        acc.update(ids, h[ids])
    got, want = acc.result(-1), token_probe(h, tok, -1, max_classes=10, seed=2)
    assert got.keys() == want.keys()
    for key in got:  # the logistic probe's rows are fixed by the plan: exact; the ridge sums differ by rounding
        if key in ("accuracy", "ci", "ce", "ce_gain", "class_ids", "n_train", "n_test"):
            assert got[key] == want[key], key
        elif isinstance(got[key], (float, tuple)):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    with pytest.raises(ValueError, match="not every planned sequence"):
        plan.accumulator().update(torch.arange(5), h[:5]).result(-1)


def test_bad_inputs_raise_value_error():
    h, tok, _ = _synthetic(0, N=40, S=16, V=30, d=8)
    with pytest.raises(ValueError, match="features must be"):
        token_probe(h[:, :8], tok, 0)
    with pytest.raises(ValueError, match="integer"):
        token_probe(h, tok.float(), 0)
    with pytest.raises(ValueError, match="offsets"):
        token_probe(h, tok, 16)


# ------------------------------------------------------------------------------------------- solver vs sklearn
def test_softmax_fit_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    n, d, C = 600, 10, 4
    y = torch.randint(0, C, (n,), generator=g)
    X = (torch.randn(C, d, generator=g)[y] + 1.5 * torch.randn(n, d, generator=g)).double()
    l2 = 1e-2
    Wb = fit_softmax(X, y, C, l2, max_iter=500, tol=1e-9)
    sk = LogisticRegression(C=1 / (l2 * n), tol=1e-10, max_iter=5000).fit(X.numpy(), y.numpy())
    # softmax weights are defined up to a per-feature constant across classes: compare centered
    W = Wb[:-1].numpy()
    W_sk = sk.coef_.T
    np.testing.assert_allclose(W - W.mean(1, keepdims=True), W_sk - W_sk.mean(1, keepdims=True), atol=2e-4)
    pred = torch.addmm(Wb[-1], X, Wb[:-1]).argmax(1).numpy()
    assert (pred == sk.predict(X.numpy())).mean() >= 0.995


def test_joint_fit_of_many_problems_equals_separate_fits():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 5, generator=g).double()
    Y = torch.randint(0, 3, (300, 4), generator=g)
    many = fit_softmax_many(X, Y, 3, 1e-2, tol=1e-9, max_iter=500)
    for p in range(4):
        torch.testing.assert_close(many[p], fit_softmax(X, Y[:, p], 3, 1e-2, tol=1e-9, max_iter=500), atol=1e-4, rtol=0)


def test_cv_picks_strong_penalty_without_signal_and_weak_with_signal():
    g = torch.Generator().manual_seed(1)
    n, d, C = 800, 20, 5
    groups = torch.arange(n) // 10
    y = torch.randint(0, C, (n,), generator=g)
    noise = torch.randn(n, d, generator=g)
    p0 = fit_softmax_cv(noise, y, groups, C)
    p1 = fit_softmax_cv(noise + 4 * torch.randn(C, d, generator=g)[y], y, groups, C)
    assert p0.l2 > p1.l2
    assert set(p0.cv) <= set(p0.cv) | {p0.l2}


# ------------------------------------------------------------------------------------------- ridge retrieval
@pytest.mark.parametrize("max_rows", [None, 10**6], ids=["sums", "rows"])
def test_ridge_stats_match_closed_form_and_cv_is_exact(max_rows):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(2)
    n, d, e = 500, 6, 3
    X = (torch.randn(n, d, generator=g) * torch.arange(1, d + 1) + 10.0).double()
    Y = X @ torch.randn(d, e, generator=g).double() + torch.randn(n, e, generator=g).double()
    fold = torch.arange(n) % 2
    st = RidgeStats(folds=2, max_rows=max_rows)
    for s in range(0, n, 64):
        st.add(X[s:s + 64], fold[s:s + 64], {"y": Y[s:s + 64]})
    fit = st.fit("y", grid=[1e-2])
    Z = StandardScaler().fit(X.numpy())
    sk = Ridge(alpha=1e-2 * n).fit(Z.transform(X.numpy()), Y.numpy())
    np.testing.assert_allclose(fit.predict(X).numpy(), sk.predict(Z.transform(X.numpy())), atol=1e-6)
    # cross-validated SSE from the statistics equals the SSE of explicit fold fits
    fit2 = st.fit("y", grid=[1e-3, 1e-1])
    for l2, mse in fit2.cv.items():
        sse = 0.0
        for f in (0, 1):
            tr = fold != f
            Zf = StandardScaler().fit(X[tr].numpy())
            m = Ridge(alpha=l2 * int(tr.sum())).fit(Zf.transform(X[tr].numpy()), Y[tr].numpy())
            sse += float(((m.predict(Zf.transform(X[~tr].numpy())) - Y[~tr].numpy()) ** 2).sum())
        assert mse == pytest.approx(sse / n, rel=1e-6)


def _direct_ridge(X, Y, l2):
    """The float64 reference: z-scored features, unpenalized intercept, (Z^T Z + l2 n I) M = Z^T (Y - ybar)."""
    mu, sd = X.mean(0), X.std(0, unbiased=False)
    Z = (X - mu) / sd
    M = torch.linalg.solve(Z.T @ Z + l2 * len(X) * torch.eye(X.shape[1], dtype=X.dtype), Z.T @ (Y - Y.mean(0)))
    return lambda Xn: Y.mean(0) + ((Xn - mu) / sd) @ M


@pytest.mark.parametrize("n,d,max_rows", [(90, 40, None), (90, 40, 0), (300, 12, None), (300, 12, 10**6)],
                         ids=["rows-n>d", "sums-n>d", "sums", "rows"])
def test_shared_ridge_solve_equals_direct_float64_solve(n, d, max_rows, monkeypatch):
    """Every offset (key) and every l2 on one eigendecomposition per training set (folds + 1 in all), rows or
    sums, n above or below d: the same maps and held-out errors as a direct solve per fit."""
    g = torch.Generator().manual_seed(7)
    X = (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3.0).double()
    fold = torch.arange(n) % 3
    Ys = {k: X @ torch.randn(d, 4, generator=g).double() + torch.randn(n, 4, generator=g).double() for k in range(3)}
    st = RidgeStats(folds=3, max_rows=max_rows)
    for s in range(0, n, 25):
        st.add(X[s:s + 25], fold[s:s + 25], {k: Y[s:s + 25] for k, Y in Ys.items()})
    assert st.in_rows == (max_rows != 0 and n <= (max_rows or d))
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: calls.append(A.shape) or eigh(A))
    grid = (1e-4, 1e-2, 1.0)
    fits = st.fit_all(grid=grid)
    assert len(calls) == 4  # 3 held-out folds + the final fit, shared by 3 keys x 3 l2
    for k, Y in Ys.items():
        ref = _direct_ridge(X, Y, fits[k].l2)(X)
        scale = float(ref.abs().max())
        assert float((fits[k].predict(X) - ref).abs().max()) <= 1e-9 * scale
        for l2 in grid:  # held-out MSE of each l2 = explicit fold fits
            sse = sum(float(((_direct_ridge(X[fold != f], Y[fold != f], l2)(X[fold == f]) - Y[fold == f]) ** 2).sum())
                      for f in range(3))
            assert fits[k].cv[l2] == pytest.approx(sse / n, rel=1e-8)
        assert fits[k].l2 == min(fits[k].cv, key=fits[k].cv.get)


def test_ridge_memory_is_flat_in_n():
    g = torch.Generator().manual_seed(0)
    st = RidgeStats(folds=3)
    sizes = []
    for _ in range(6):
        st.add(torch.randn(8, 16, generator=g), torch.arange(8) % 3, {0: torch.randn(8, 5, generator=g)})
        sizes.append(st.nbytes())
    assert not st.in_rows and sizes[2] == sizes[3] == sizes[5]  # past d = 16 rows: fixed-size sums
    assert sizes[0] < sizes[1] < sizes[2]  # up to d rows: the rows themselves, less than the sums


def test_pca_code_keeps_the_top_principal_directions():
    from meshprobe.analysis.probes.retrieval import pca_code

    g = torch.Generator().manual_seed(0)
    scale = torch.cat([torch.full((8,), 5.0), torch.full((40,), 0.3)])
    E = torch.randn(700, 48, generator=g) * scale + 2.0
    P = pca_code(E.to(torch.bfloat16).float(), 8, chunk=100).double()  # several chunks
    Ec = E.to(torch.bfloat16).double()
    Ec -= Ec.mean(0)
    ref = Ec @ torch.linalg.svd(Ec, full_matrices=False).Vh[:8].T
    dist, ref_dist = torch.cdist(P, P), torch.cdist(ref, ref)
    assert float((dist - ref_dist).abs().max()) <= 1e-3 * float(ref_dist.max())  # up to rotation within the 8
    tok = _zipf_tokens(g, 40, 16, 30)
    plan = TokenProbePlan(tok, [0], embedding=E, max_code_dim=8)
    assert plan.code.shape == (700, 8) and "principal components" in plan.code_name
    assert TokenProbePlan(tok, [0], embedding=E).code_name == "embedding"


def test_retrieval_ranks():
    code = torch.eye(4)
    pred = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.8, 0, 0], [0.5, 0.4, 0, 1]])
    hits = retrieval_ranks(pred, code, torch.tensor([0, 1, 2]), k=3)
    assert hits.tolist() == [[True, True, True], [False, True, True], [False, False, False]]


# ------------------------------------------------------------------------------------------- increment
def test_increment_over_base_state():
    g = torch.Generator().manual_seed(5)
    N, S, V, d = 200, 48, 150, 32
    tok = _zipf_tokens(g, N, S, V)
    E1, E2 = torch.randn(V, d, generator=g), torch.randn(V, d, generator=g)
    base = E1[tok] + 0.1 * torch.randn(N, S, d, generator=g)
    prev = torch.zeros(N, S, d)
    prev[:, 1:] = E2[tok[:, :-1]]
    knows_prev = base + prev + 0.1 * torch.randn(N, S, d, generator=g)
    r = token_probe_increment(knows_prev, base, tok, -1, max_classes=16)
    assert r["delta_accuracy"] > 0.5 and r["delta_accuracy_ci"][0] > 0.3 and r["delta_ce"] > 1.0
    same = token_probe_increment(2 * base + 0.1 * torch.randn(N, S, d, generator=g), base, tok, -1, max_classes=16)
    assert abs(same["delta_accuracy"]) < 0.05 and abs(same["delta_ce"]) < 0.1
    assert same["delta_accuracy_ci"][0] <= same["delta_accuracy"] <= same["delta_accuracy_ci"][1]


# ------------------------------------------------------------------------------------------- loop-step probe
def _loop_states(direction: bool, seed=0, N=60, S=32, d=16, K=3):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(K, d, generator=g) * 0.8
    mean = 4 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    outs, upds = [], []
    for t in range(K):
        v = torch.randn(N, S, d, generator=g)
        if direction:
            v = v + dirs[t]  # same norm distribution, a different mean direction per step
            u = torch.randn(N, S, d, generator=g) + dirs[t]
        else:
            v = (mean + 0.3 * v) * (1.0 + t)  # steps differ only in norm: same directions for every t
            u = (mean + 0.3 * torch.randn(N, S, d, generator=g)) * 0.5 ** t
        outs.append(v)
        upds.append(u)
    return outs, upds


def test_loop_probe_norm_only_steps():
    outs, upds = _loop_states(direction=False)
    r = loop_step_probe(outs, upds, n_perm=5)
    assert set(LOOP_FEATURES) <= set(r)
    for kind in ("state_norm", "update_norm", "state", "update"):
        assert r[kind]["accuracy"] > 0.95, kind
    for kind in ("state_unit", "update_unit"):
        assert abs(r[kind]["accuracy"] - 1 / 3) < 0.06, (kind, r[kind]["accuracy"])
        assert r[kind]["p_value"] > 0.05 or r[kind]["accuracy"] < r[kind]["null_q95"] + 0.03
    assert r["state_norm"]["p_value"] == pytest.approx(1 / 6)
    assert abs(r["state_unit"]["null_mean"] - 1 / 3) < 0.06 and abs(r["state_norm"]["null_mean"] - 1 / 3) < 0.15
    for kind in LOOP_FEATURES:
        lo, hi = r[kind]["ci"]
        assert lo <= r[kind]["accuracy"] <= hi and r[kind]["chance"] == pytest.approx(1 / 3)


def test_loop_probe_direction_steps():
    outs, upds = _loop_states(direction=True)
    r = loop_step_probe(outs, upds, n_perm=3)
    for kind in ("state", "update", "state_unit", "update_unit"):
        assert r[kind]["accuracy"] > 0.8, kind
    assert r["state_norm"]["accuracy"] < 0.5
    assert r == loop_step_probe(outs, upds, n_perm=3)


# ------------------------------------------------------------------------------------------- stats helpers
def test_bootstrap_ci_contains_point_and_shrinks():
    g = np.random.default_rng(0)
    for n_seq in (5, 50, 500):
        den = g.integers(5, 20, n_seq).astype(float)
        num = g.binomial(den.astype(int), 0.3).astype(float)
        lo, hi = bootstrap_ratio_ci(torch.tensor(num), torch.tensor(den), seed=1)
        assert lo <= num.sum() / den.sum() <= hi
        assert bootstrap_ratio_ci(torch.tensor(num), torch.tensor(den), seed=1) == (lo, hi)
        if n_seq == 500:
            assert hi - lo < 0.05
    assert bootstrap_ratio_ci(torch.tensor([3.0]), torch.tensor([4.0])) == (0.75, 0.75)


def test_disjoint_windows_share_no_position():
    L, n, S = 10_000, 60, 128
    w = sample_disjoint_windows(np.arange(L), n, S, seed=3)
    assert w.shape == (n, S) and len(np.unique(w)) == n * S
    assert (np.diff(w, axis=1) == 1).all()  # contiguous windows
    assert np.array_equal(w, sample_disjoint_windows(np.arange(L), n, S, seed=3))
    assert not np.array_equal(w, sample_disjoint_windows(np.arange(L), n, S, seed=4))
    test = is_test_sequence(np.arange(n), 0.3, 0)
    assert shared_ngram_fraction(w[~test], w[test], 16) == 0.0
    # overlapping random windows (the old sampler) do share 16-grams
    g = np.random.default_rng(0)
    starts = g.integers(0, L - S, n)
    w_old = np.arange(L)[starts[:, None] + np.arange(S)]
    assert shared_ngram_fraction(w_old[~test], w_old[test], 16) > 0
    m = shares_ngram(w_old[~test], w_old[test], 16)
    assert m.dtype == bool and m.mean() == shared_ngram_fraction(w_old[~test], w_old[test], 16)
    # a window whose 16 first tokens occur in a training window is flagged, one shifted by 1 token inside it too
    tr = np.arange(100)[None, :]
    assert shares_ngram(tr, np.stack([np.arange(50, 150), np.arange(200, 300)]), 16).tolist() == [True, False]
    with pytest.raises(ValueError, match="disjoint windows"):
        sample_disjoint_windows(np.arange(100), 2, 51)
