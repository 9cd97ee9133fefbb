"""Tests for meshprobe.analysis.metrics (paper §2 diagnostics on plain tensors)."""
import math

import pytest
import torch
from conftest import f32_tol, f64_tol

from meshprobe.analysis.metrics import (
    RunningStats,
    cka_matrix,
    effective_rank,
    gram_rbf,
    linear_cka,
    rbf_cka,
    relative_update,
    singular_spectrum,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _orth(d, g):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# ---------------------------------------------------------------- relative update
def test_relative_update_known_values():
    g = _gen()
    h = torch.randn(16, 8, generator=g)
    assert relative_update(h, h).item() == 0.0
    assert relative_update(-h, h).item() == pytest.approx(2.0, abs=1e-12)
    assert relative_update(2 * h, h).item() == pytest.approx(2 / 3, abs=1e-12)
    assert relative_update(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_relative_update_batched_matches_loop():
    g = _gen(1)
    h = torch.randn(5, 16, 8, generator=g)
    f = h + 0.3 * torch.randn(5, 16, 8, generator=g)
    r = relative_update(f, h)
    assert r.shape == (5,) and r.dtype == torch.float64
    for i in range(5):
        fi, hi = f[i].double(), h[i].double()
        expect = 2 * (fi - hi).norm() / (fi.norm() + hi.norm())
        assert r[i].item() == pytest.approx(expect.item(), rel=1e-12)
    with pytest.raises(ValueError):
        relative_update(h, h[:, :4])


# ---------------------------------------------------------------- CKA
@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_cka_self_is_one(cka):
    X = torch.randn(64, 32, generator=_gen(2))
    assert cka(X, X).item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_cka_invariances(cka):
    g = _gen(3)
    X = torch.randn(80, 24, generator=g, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(24, 40, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(80, 40, generator=g,
                                                                                                   dtype=torch.float64)
    base = cka(X, Y).item()
    assert 0.05 < base < 0.999
    Q = _orth(24, g)
    assert cka(3.7 * X @ Q, Y).item() == pytest.approx(base, abs=1e-9)
    assert cka(X, 0.01 * Y @ _orth(40, g)).item() == pytest.approx(base, abs=1e-9)
    # translation of all rows does not matter either (centering / distances)
    assert cka(X + 5.0, Y).item() == pytest.approx(base, abs=1e-9)


def test_rbf_cka_not_invariant_to_anisotropic_scaling():
    # sanity check that the invariance test above can fail: stretching one axis changes RBF CKA
    g = _gen(4)
    X = torch.randn(80, 6, generator=g, dtype=torch.float64)
    Y = X ** 2
    S = torch.diag(torch.tensor([20.0, 1, 1, 1, 1, 1], dtype=torch.float64))
    assert abs(rbf_cka(X @ S, Y).item() - rbf_cka(X, Y).item()) > 1e-3


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_cka_independent_small_vs_noisy_copy(cka):
    g = _gen(5)
    X = torch.randn(256, 6, generator=g)
    Z = torch.randn(256, 6, generator=g)
    noisy = X + 0.3 * torch.randn(256, 6, generator=g)
    c_ind, c_noisy = cka(X, Z).item(), cka(X, noisy).item()
    assert c_noisy > 0.8
    assert c_ind < 0.2
    assert c_noisy > c_ind + 0.6


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_debiased_cka_removes_high_dim_floor(cka):
    # few examples in many dimensions: biased CKA of independent data is large, debiased is ~0
    g = _gen(14)
    X = torch.randn(64, 512, generator=g)
    Z = torch.randn(64, 512, generator=g)
    noisy = X + 0.5 * torch.randn(64, 512, generator=g)
    assert cka(X, Z).item() > 0.5
    assert abs(cka(X, Z, debiased=True).item()) < 0.1
    assert cka(X, noisy, debiased=True).item() > 0.5
    assert cka(X, X, debiased=True).item() == pytest.approx(1.0, abs=1e-10)


def test_debiased_linear_cka_matches_kornblith_feature_formula():
    # Kornblith et al.'s feature-space debiased linear CKA (independent implementation of the estimator)
    g = _gen(15)
    n = 40
    X = torch.randn(n, 10, generator=g, dtype=torch.float64)
    Y = X[:, :6] ** 2 + torch.randn(n, 6, generator=g, dtype=torch.float64)

    def hsic_u(xc, yc):  # unbiased HSIC of linear kernels, Song et al. 2012 eq. (5)
        K, L = xc @ xc.T, yc @ yc.T
        K = K - torch.diag(K.diagonal())
        L = L - torch.diag(L.diagonal())
        one = torch.ones(n, dtype=torch.float64)
        return ((K * L).sum() + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))

    xc, yc = X - X.mean(0), Y - Y.mean(0)
    ref = hsic_u(xc, yc) / (hsic_u(xc, xc) * hsic_u(yc, yc)).sqrt()
    assert linear_cka(X, Y, debiased=True).item() == pytest.approx(ref.item(), abs=1e-10)


def test_linear_cka_gram_and_feature_routes_agree():
    g = _gen(6)
    X = torch.randn(20, 100, generator=g, dtype=torch.float64)  # n < d: Gram route
    Y = X[:, :50] + torch.randn(20, 50, generator=g, dtype=torch.float64)
    xc, yc = X - X.mean(0), Y - Y.mean(0)
    ref = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(X, Y).item() == pytest.approx(ref.item(), rel=1e-10)
    X2, Y2 = X.T[:, :5].contiguous(), Y.T[:50, :3].contiguous()  # n > d: feature route
    X2 = X2[:50]
    xc, yc = X2 - X2.mean(0), Y2 - Y2.mean(0)
    ref = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(X2, Y2).item() == pytest.approx(ref.item(), rel=1e-10)


def test_rbf_cka_matches_kornblith_reference_formula():
    # independent numpy-style reference: sigma = frac * median distance over i<j pairs
    g = _gen(7)
    X = torch.randn(31, 7, generator=g, dtype=torch.float64)
    Y = X.sin() + 0.2 * torch.randn(31, 5, generator=g, dtype=torch.float64)[:, :1]

    def ref_gram(A, frac=0.5):
        D = torch.cdist(A, A)
        iu = torch.triu_indices(len(A), len(A), 1)
        sigma = frac * D[iu[0], iu[1]].median()  # odd number of pairs (465): exact median
        return torch.exp(-D ** 2 / (2 * sigma ** 2))

    def ref_cka(K, L):
        H = torch.eye(len(K), dtype=K.dtype) - 1.0 / len(K)
        Kc, Lc = H @ K @ H, H @ L @ H
        return (Kc * Lc).sum() / (Kc.norm() * Lc.norm())

    assert torch.allclose(gram_rbf(X), ref_gram(X), atol=1e-10)
    assert rbf_cka(X, Y).item() == pytest.approx(ref_cka(ref_gram(X), ref_gram(Y)).item(), abs=1e-10)
    assert rbf_cka(X, Y, sigma_frac=0.2).item() == pytest.approx(
        ref_cka(ref_gram(X, 0.2), ref_gram(Y, 0.2)).item(), abs=1e-10)


def test_cka_batched_and_matrix():
    g = _gen(8)
    S, n = 4, 40
    base = torch.randn(n, 16, generator=g)
    states = [base + k * 0.7 * torch.randn(n, 16, generator=g) for k in range(S)]
    states.append(torch.randn(n, 8, generator=g))  # a different width is allowed in the list form
    for kind, fn in (("rbf", rbf_cka), ("linear", linear_cka)):
        for deb in (False, True):
            M = cka_matrix(states, kind=kind, debiased=deb)
            assert M.shape == (S + 1, S + 1)
            assert torch.allclose(M, M.T)
            assert torch.allclose(M.diagonal(), torch.ones(S + 1, dtype=torch.float64), atol=1e-12)
            for i in range(S + 1):
                for j in range(S + 1):
                    assert M[i, j].item() == pytest.approx(fn(states[i], states[j], debiased=deb).item(), abs=1e-10)
    # tensor form with a leading batch dim, and batched pairwise CKA
    T = torch.stack(states[:S])  # [S, n, d]
    TB = torch.stack([T, T.flip(0)])  # [2, S, n, d]
    MB = cka_matrix(TB, kind="rbf")
    assert MB.shape == (2, S, S)
    assert torch.allclose(MB[0], cka_matrix(states[:S]), atol=1e-12)
    assert torch.allclose(MB[1], MB[0].flip(0).flip(1), atol=1e-12)
    assert torch.allclose(rbf_cka(T, T.flip(0)), torch.stack([rbf_cka(T[i], T[S - 1 - i]) for i in range(S)]))
    assert torch.allclose(linear_cka(T, T.flip(0)), torch.stack([linear_cka(T[i], T[S - 1 - i]) for i in range(S)]))


def test_cka_degenerate_is_nan():
    X = torch.randn(10, 4, generator=_gen(9))
    assert math.isnan(linear_cka(X, torch.ones(10, 3)).item())
    assert math.isnan(rbf_cka(X, torch.ones(10, 3)).item())


# ---------------------------------------------------------------- spectra
def test_singular_spectrum_recovers_planted_values():
    g = _gen(10)
    seq, d, k = 60, 40, 12
    U, _ = torch.linalg.qr(torch.randn(seq, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 7, 5, 3, 2, 1.5, 1, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    X = (U * s) @ V.T
    out = singular_spectrum(X, top=k)
    assert torch.allclose(out, s / s[0], atol=1e-10)
    # top larger than min(seq, d): padded with NaN after min(seq, d); rank-deficient part is ~0
    out = singular_spectrum(X, top=50)
    assert out.shape == (50,)
    assert torch.isnan(out[40:]).all() and not torch.isnan(out[:40]).any()
    assert out[k:40].abs().max() < 1e-10
    # float32 input, batched
    B = torch.stack([X, 2 * X]).float()
    ob = singular_spectrum(B, top=k)
    assert ob.shape == (2, k) and ob.dtype == torch.float64
    # 2 X is exact in float32, so the two spectra differ by float64 rounding only; against the planted values
    # the float32 rounding of X moves each singular value by up to eps32 * ||X||
    torch.testing.assert_close(ob[0], ob[1], **f64_tol(ob[1], seq * d))
    torch.testing.assert_close(ob[0], s / s[0], **f32_tol(None, seq * d, scale=1.0))


def test_singular_spectrum_centering():
    g = _gen(11)
    X = torch.randn(50, 10, generator=g, dtype=torch.float64) + 100.0  # big common offset = one huge direction
    unc = singular_spectrum(X, top=10)
    cen = singular_spectrum(X, top=10, center=True)
    assert unc[1] < 0.05  # dominated by the mean direction
    assert cen[1] > 0.5
    ref = torch.linalg.svdvals(X - X.mean(0))
    assert torch.allclose(cen, ref / ref[0])


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_equal_singular_values(k):
    g = _gen(12)
    U, _ = torch.linalg.qr(torch.randn(30, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(20, k, generator=g, dtype=torch.float64))
    X = 3.0 * U @ V.T
    assert effective_rank(X).item() == pytest.approx(k, abs=1e-8)


def test_effective_rank_formula_and_range():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    X = torch.diag(s)
    p = s / s.sum()
    assert effective_rank(X).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    assert 1.0 < effective_rank(X).item() < 4.0
    assert math.isnan(effective_rank(torch.zeros(3, 3)).item())


# ---------------------------------------------------------------- RunningStats
def test_running_stats_matches_torch():
    g = _gen(13)
    xs = torch.randn(37, 3, 5, generator=g, dtype=torch.float64) * 4 + 10
    rs = RunningStats()
    for x in xs:
        rs.update(x)
    assert rs.n == 37
    assert torch.allclose(rs.mean, xs.mean(0), atol=1e-12)
    assert torch.allclose(rs.std, xs.std(0), atol=1e-12)
    # batched updates and merging give the same result
    rb = RunningStats().update_batch(xs[:10]).update_batch(xs[10:])
    assert torch.allclose(rb.mean, xs.mean(0)) and torch.allclose(rb.std, xs.std(0))
    r1, r2 = RunningStats(), RunningStats()
    [r1.update(x) for x in xs[:20]]
    [r2.update(x) for x in xs[20:]]
    r1.merge(r2)
    assert r1.n == 37 and torch.allclose(r1.std, xs.std(0))


def test_running_stats_scalars_nan_and_memory():
    rs = RunningStats()
    vals = [1.0, 2.0, 4.0, 7.0]
    for v in vals:
        rs.update(v)
    assert rs.mean.item() == pytest.approx(3.5) and rs.std.item() == pytest.approx(torch.tensor(vals).std().item())
    # NaN entries (e.g. NaN-padded spectra) are skipped element-wise
    r = RunningStats()
    r.update(torch.tensor([1.0, float("nan")]))
    r.update(torch.tensor([3.0, 5.0]))
    r.update(torch.tensor([5.0, 7.0]))
    assert torch.allclose(r.mean, torch.tensor([3.0, 6.0], dtype=torch.float64))
    assert r.count.tolist() == [3, 2]
    # memory independent of the number of samples
    m = RunningStats()
    m.update(torch.zeros(8, 8))
    size = m.nbytes
    for _ in range(200):
        m.update(torch.randn(8, 8))
    assert m.nbytes == size
    with pytest.raises(ValueError):
        m.update(torch.zeros(4))
