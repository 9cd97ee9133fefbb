"""meshprobe.dynamics: planted loop maps (known spectra, a 3-cycle, a fixed point, a drift), the loop maps of
real models against their own forward, exit rules on planted runs, the tuned lens against planted per-step
distortions, and bad input."""
import math

import numpy as np
import pytest
import torch
from conftest import ALL_VARIANTS, f32_tol, model_tol, random_model, random_tokens, tiny_cfg
from hf_standins import OuroForCausalLM, RavenForCausalLM, ouro_config, raven_config

import meshprobe as mp
from meshprobe import hf
from meshprobe.dynamics.exits import exits, settle_steps
from meshprobe.dynamics.trajectory import classify, cycles, directions
from meshprobe.errors import UserError

EPS32 = torch.finfo(torch.float32).eps


def _rot(theta):
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)


def planted(r_pair, theta, rest, seq=3, d=6, normal=False, seed=0):
    """A real [n, n] matrix (n = seq*d) with eigenvalues r_pair * exp(+-i theta) and `rest` (moduli below),
    in a random basis (orthogonal when `normal`, else a general invertible one)."""
    g = torch.Generator().manual_seed(seed)
    n = seq * d
    core = torch.zeros(n, n, dtype=torch.float64)
    core[:2, :2] = r_pair * _rot(theta)
    core[2:, 2:] = torch.diag(rest * (0.2 + 0.8 * torch.rand(n - 2, generator=g, dtype=torch.float64)))
    p = torch.randn(n, n, generator=g, dtype=torch.float64)
    if normal:
        p = torch.linalg.qr(p)[0]
    return p @ core @ torch.linalg.inv(p)


def linear_step(mats, seq, d):
    m32 = torch.stack(mats).float()
    return lambda h: torch.einsum("bij,bj->bi", m32, h.reshape(len(mats), -1)).reshape(len(mats), seq, d)


@pytest.mark.parametrize("normal", [True, False])
def test_spectrum_recovers_planted_linear_maps(normal):
    seq, d = 3, 6
    # contracting complex pair, expanding complex pair, a real dominant eigenvalue, a near-rotation (rho ~ 1)
    cases = [(0.9, 2.0, 0.6), (1.3, 0.7, 1.0), (0.5, 1.0, 0.3), (1.0, math.pi / 3, 0.5)]
    mats = [planted(r, th, rest, seq, d, normal, seed=i) for i, (r, th, rest) in enumerate(cases)]
    s = mp.dynamics.spectrum(linear_step(mats, seq, d), torch.randn(len(mats), seq, d), k=4, iters=100)
    ref_sigma = torch.stack([torch.linalg.svdvals(a)[:4] for a in mats])
    ref_eig = [torch.linalg.eigvals(a) for a in mats]
    ref_rho = torch.stack([e.abs().max() for e in ref_eig])
    scale = max(ref_sigma.max().item(), 1.0)
    # float32 products of a float64 matrix: errors of a few eps x the largest singular value (x n for Krylov)
    tol = 50 * seq * d * EPS32 * scale
    torch.testing.assert_close(s.sigma, ref_sigma, rtol=0, atol=tol)
    torch.testing.assert_close(s.rho, ref_rho, rtol=0, atol=tol * 10)
    for i, (r, th, _) in enumerate(cases):  # the dominant pair, both members, conjugate
        top = s.eigvals[i, :2]
        assert torch.allclose(top.abs(), torch.full((2,), r, dtype=torch.float64), atol=tol * 10)
        assert torch.allclose(top.angle().abs(), torch.full((2,), th, dtype=torch.float64), atol=tol * 10 / r)
        assert abs(top[0].imag + top[1].imag) < tol * 10


def test_power_iteration_would_fail_where_arnoldi_does_not():
    """A complex dominant pair: ||J^n v|| oscillates, so a short power iteration misreads rho; Arnoldi does not."""
    seq, d = 2, 4
    a = planted(0.8, 2.5, 0.7, seq, d, normal=False, seed=3)
    s = mp.dynamics.spectrum(linear_step([a], seq, d), torch.randn(1, seq, d), k=2, iters=8)
    assert abs(s.rho.item() - 0.8) < 500 * seq * d * EPS32 * torch.linalg.svdvals(a).max().item()
    assert s.iters == 8


def test_spectrum_of_a_model_step_matches_its_explicit_jacobian():
    """An attention model: each sequence's [seq*d, seq*d] Jacobian, formed in float64 for the reference."""
    cfg = tiny_cfg(variant="anchor", n_ctx=6, d_model=16, n_heads=2)
    model = random_model(cfg)
    x = random_tokens(cfg, batch=2)
    step = mp.dynamics.loop_map(model, x, 1)
    h = step.h_t
    s = mp.dynamics.spectrum(step, h, k=3, iters=96)  # iters = seq*d: exact Krylov space
    m64 = random_model(cfg).double()
    step64 = mp.dynamics.loop_map(m64, x, 1)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: step64(v.reshape(1, 6, 16))[0], h[i:i + 1].double())
        jac = jac.reshape(96, 96)
        ref_sigma = torch.linalg.svdvals(jac)[:3]
        ref_rho = torch.linalg.eigvals(jac).abs().max()
        # float32 model vs float64 reference: each value comes through 96 Krylov products of the model's sums
        tol = f32_tol(ref_sigma, n_terms=cfg.d_mlp * 96, layers=cfg.n_layers + 1, scale=ref_sigma[0].item())
        torch.testing.assert_close(s.sigma[i], ref_sigma, **tol)
        assert abs(s.rho[i].item() - ref_rho.item()) < tol["atol"]


@pytest.mark.parametrize("variant", [*ALL_VARIANTS, "base@1+2+2+1"])
def test_loop_map_equals_the_models_own_step(variant):
    variant, layout = (variant.split("@") + ["1+2R3+1"])[:2]
    cfg = tiny_cfg(variant=variant, layout=layout)
    model = random_model(cfg)
    x = random_tokens(cfg, batch=2)
    _, cache = model.run_with_cache(x)
    for t in range(cfg.n_loops):
        step = mp.dynamics.loop_map(model, x, t)
        with torch.no_grad():
            got = step(cache[f"loop.{t}.hook_state_in"])
        ref = cache[f"loop.{t}.hook_state_out"]
        torch.testing.assert_close(got, ref, **model_tol(ref, cfg))


def test_trajectory_past_k_equals_the_model_run_with_more_loops():
    cfg = tiny_cfg(variant="anchor")
    model = random_model(cfg)
    x = random_tokens(cfg, batch=2)
    r = mp.dynamics.run(model, x, steps=7)
    deep = mp.build_model(cfg.with_loops(7)).eval()
    deep.load_state_dict(model.state_dict())
    logits, cache = deep.run_with_cache(x)
    for t in range(7):
        ref = cache[f"loop.{t}.hook_state_out"]
        torch.testing.assert_close(r.states[t + 1], ref, **model_tol(ref, deep.cfg))
    torch.testing.assert_close(r.logits[-1], logits, **model_tol(logits, deep.cfg))


def _orbit(step, h0, steps):
    states = [h0]
    for _ in range(steps):
        states.append(step(states[-1]))
    return torch.stack(states)


def test_a_period_3_cycle_is_found():
    seq, d = 2, 4
    rot = torch.block_diag(*[_rot(2 * math.pi / 3)] * (seq * d // 2)).float()
    # attracted onto a circle of radius 5 per position, rotated by 120 degrees: a period-3 orbit
    step = lambda h: 5 * directions((h.reshape(h.shape[0], -1) @ rot.T).reshape(h.shape))
    states = _orbit(step, torch.randn(3, seq, d), 12)
    assert cycles(states).tolist() == [3, 3, 3]
    labels, why = classify(states)
    assert labels == ["cycling"] * 3 and why["period"] == [3, 3, 3]


def test_a_fixed_point_is_found_with_its_jacobian():
    seq, d = 3, 4
    target = torch.randn(1, seq, d)
    step = lambda h: target + 0.5 * torch.tanh(h - target)  # fixed point target, Jacobian 0.5 I there
    states = _orbit(step, torch.randn(2, seq, d) * 3, 40)
    torch.testing.assert_close(states[-1], target.expand(2, -1, -1), **f32_tol(target, n_terms=2))
    labels, _ = classify(states)
    assert labels == ["contracting"] * 2 and cycles(states).tolist() == [1, 1]
    s = mp.dynamics.spectrum(step, target.expand(2, -1, -1).clone(), k=2, iters=12)
    tol = f32_tol(0.5, n_terms=seq * d)  # Krylov sums over the 12 dimensions of one sequence
    torch.testing.assert_close(s.sigma, torch.full((2, 2), 0.5, dtype=torch.float64), **tol)
    torch.testing.assert_close(s.rho, torch.full((2,), 0.5, dtype=torch.float64), **tol)
    labels, _ = classify(states[:6])  # not there yet, but the steps shrink geometrically
    assert labels == ["contracting"] * 2 and cycles(states[:6]).tolist() == [0, 0]


def test_drift_and_expansion_are_drifting():
    h0 = torch.randn(2, 2, 3)
    drift = _orbit(lambda h: h + 1.0, h0, 10)
    expand = _orbit(lambda h: 1.2 * h, h0, 10)
    assert classify(drift)[0] == ["drifting"] * 2
    assert classify(expand)[0] == ["drifting"] * 2
    assert classify(directions(expand))[0] == ["contracting"] * 2  # its direction is fixed from the start


# -- transformers looped models --------------------------------------------------------------------------
def _dory(loops=3):
    from transformers import DoryConfig, DoryForCausalLM

    torch.manual_seed(0)
    return DoryForCausalLM(DoryConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, n_input_layers=1, n_output_layers=1, n_recurrent_loops=loops,
        sliding_window=8, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("kind", ["dory", "ouro", "raven"])
def test_hf_loop_map_and_trajectory(kind):
    torch.manual_seed(0)
    model = {"dory": _dory, "ouro": lambda: OuroForCausalLM(ouro_config()).eval(),
             "raven": lambda: RavenForCausalLM(raven_config(mean_recurrence=3)).eval()}[kind]()
    w = hf.wrap(model, loops=3)
    x = random_tokens(tiny_cfg(vocab_size=50), batch=2, seq=8)
    r = mp.dynamics.run(w, x, steps=6)  # twice the wrapped K
    assert r.states.shape[:2] == (7, 2) and r.logits.shape[:2] == (6, 2)
    field = {"dory": "n_recurrent_loops", "ouro": "total_ut_steps", "raven": "mean_recurrence"}[kind]
    assert w.cfg.n_loops == 3 and getattr(model.config, field) == 3  # the step count is restored after the run
    assert (r.gates is not None) == (kind == "ouro")
    for t in range(3):
        step = mp.dynamics.loop_map(w, x, t)
        torch.testing.assert_close(step.h_t, r.states[t], rtol=0, atol=0)  # the same forward, stopped early
        if t < 2:
            with torch.no_grad():
                got = step(r.states[t])
            # the same ops on the same input; a float32 sum's rounding may differ between the two calls
            torch.testing.assert_close(got, r.states[t + 1], **f32_tol(r.states[t + 1], n_terms=64, layers=4))
    s = mp.dynamics.spectrum(mp.dynamics.loop_map(w, x, 1), r.states[1], k=2, iters=6)
    assert s.sigma.shape == (2, 2) and torch.isfinite(s.sigma).all() and (s.sigma[:, 0] >= s.sigma[:, 1]).all()
    rules = exits(r.logits, r.states, horizon=3, gates=r.gates)["rules"]
    assert ("ouro_gate" in rules) == (kind == "ouro") and rules["oracle"]["answer_changed"] == 0
    if kind == "ouro":  # the gate's own exit: the first step whose cumulative exit probability reaches 0.5
        lam = torch.sigmoid(r.gates[:3].double())
        first = ((1 - torch.cumprod(1 - lam, 0)) >= 0.5).double().argmax(0) + 1
        fired = ((1 - torch.cumprod(1 - lam, 0)) >= 0.5).any(0)
        want = torch.where(fired, first, torch.full_like(first, 3)).double().mean().item()
        assert rules["ouro_gate"]["mean_exit"] == pytest.approx(want)
    traj = mp.dynamics.trajectory(w, x, steps=4, iters=4, every=2)
    assert len(traj["rel_update"]) == 4 and traj["rho"][1] is None and traj["rho"][0] > 0
    assert traj["label"] in ("contracting", "cycling", "drifting")


# -- exits ----------------------------------------------------------------------------------------------------
def test_settle_steps_and_exit_rules_on_a_planted_run():
    H, V, d = 8, 5, 4
    settle_at = torch.tensor([[1, 3, 6, 8]])  # per position, the step from which the answer is final
    logits = torch.zeros(H, 1, 4, V)
    for pos, s in enumerate(settle_at[0].tolist()):
        for t in range(H):
            logits[t, 0, pos, 4 if t + 1 >= s else t % 4] = 10.0  # the final answer is token 4
    assert settle_steps(logits).tolist() == settle_at.tolist()
    # states: h^(t) = u + 2^-t w, so ||h^(t) - h^(t-1)|| / ||h^(t)|| ~ 2^-t ||w|| / ||u||
    u, w = torch.tensor([10.0, 0, 0, 0]), torch.tensor([0, 4.0, 0, 0])
    states = torch.stack([(u + 2.0 ** -t * w).expand(1, 4, d) for t in range(H + 1)])
    rel = [((2.0 ** -t) * 4) / math.hypot(10, 2.0 ** -t * 4) for t in range(1, H + 1)]
    want = 1 + next(i for i, v in enumerate(rel) if v < 0.03)
    gates = torch.zeros(H, 1, 4)  # sigmoid(0) = 0.5: the cumulative exit probability is 0.5 after step 1
    out = exits(logits, states, gates=gates)
    rules = out["rules"]
    assert rules["latent_diff"]["mean_exit"] == want
    assert rules["ouro_gate"]["mean_exit"] == 1 and rules["ouro_gate"]["premature"] == 0.75
    assert rules["oracle"]["answer_changed"] == 0 and rules["oracle"]["mean_exit"] == settle_at.double().mean()
    # the argmax stays the same only after settling: 5 equal comparisons -> exit at settle + 5, capped at H
    assert rules["argmax_stable"]["mean_exit"] == np.mean([min(s + 5, H) if s + 5 <= H else H for s in [1, 3, 6, 8]])
    assert rules["latent_diff"]["answer_changed"] == pytest.approx(np.mean([want < s for s in [1, 3, 6, 8]]))
    assert out["horizon"] == H and exits(logits, states, horizon=3)["horizon"] == 3
    with pytest.raises(UserError, match="horizon=9"):
        exits(logits, states, horizon=9)


# -- tuned lens -----------------------------------------------------------------------------------------------
def _planted_lens_data(S=3, N=600, d=8, V=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    unembed = torch.randn(V, d, generator=g)
    readout = lambda h: torch.nn.functional.layer_norm(h, (d,)) @ unembed.T
    final = torch.randn(N, d, generator=g)
    mats = [torch.eye(d) + 0.8 * torch.randn(d, d, generator=g) / math.sqrt(d) for _ in range(S)]
    states = torch.stack([final @ m.T + torch.randn(d, generator=g) for m in mats])
    return states, final, readout


def test_the_tuned_lens_undoes_planted_per_step_distortions():
    states, final, readout = _planted_lens_data()
    logits = readout(final)
    lens = mp.dynamics.fit_tuned_lens(states[:, :400], logits[:400], readout, final[:400], steps=20)
    kl = mp.dynamics.lens_kl(lens, states[:, 400:], logits[400:], readout)
    for i in range(3):
        assert kl["logit"][i] > 0.1  # the distortion hides the answer from the logit lens
        assert kl["tuned"][i] < 1e-3 * kl["logit"][i]  # held-out positions: the translator inverted it
        assert kl["shared"][i] > 10 * kl["tuned"][i]  # one map cannot undo three different distortions


def test_a_saved_lens_reloads_and_is_refused_for_another_model(tmp_path):
    cfg = tiny_cfg(variant="anchor")
    model, other = random_model(cfg, seed=0), random_model(cfg, seed=1)
    x = random_tokens(cfg, batch=4)
    from meshprobe.dynamics.analyze import lens_section

    lens, sec = lens_section(model, x, fit_steps=3)
    assert sec["fitted"] and sec["states"] == ["h^(0)", "h^(1)", "h^(2)", "h^(3)"] and sec["kl"]["coda"][-1] < 1e-6
    lens.save(tmp_path / "lens")
    again, sec2 = lens_section(model, x, lens=tmp_path / "lens")
    assert not sec2["fitted"] and sec2["kl"]["tuned"] == pytest.approx(sec["kl"]["tuned"], rel=1e-5)
    torch.testing.assert_close(again.weight, lens.weight)
    with pytest.raises(UserError, match="fitted on another model"):
        mp.dynamics.load_lens(tmp_path / "lens", other)
    with pytest.raises(UserError, match="not a saved tuned lens"):
        mp.dynamics.load_lens(tmp_path, model)


# -- bad input --------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line():
    vanilla = random_model(tiny_cfg(variant="vanilla", layout="5"))
    x = random_tokens(vanilla.cfg)
    with pytest.raises(UserError, match="has no loop steps"):
        mp.dynamics.loop_map(vanilla, x, 0)
    mesh = random_model(tiny_cfg(variant="mesh"))
    with pytest.raises(UserError, match="t=3: this mesh model has parameters for its 3 loop steps"):
        mp.dynamics.loop_map(mesh, x, 3)
    with pytest.raises(UserError, match="steps=5: this mesh model has parameters for its 3 loop steps only"):
        mp.dynamics.run(mesh, x, steps=5)
    assert mp.dynamics.default_steps(mesh) == 3 and mp.dynamics.default_steps(random_model(tiny_cfg())) == 12
    h = torch.randn(2, 3, 4)
    with pytest.raises(UserError, match="k=13"):
        mp.dynamics.spectrum(lambda v: v, h, k=13)
    with pytest.raises(UserError, match="iters=2"):
        mp.dynamics.spectrum(lambda v: v, h, k=3, iters=2)
    with pytest.raises(UserError, match="same shape"):
        mp.dynamics.spectrum(lambda v: v[:, :1], h)
    with pytest.raises(UserError, match=r"h must be a float tensor \[b, seq, d\]"):
        mp.dynamics.spectrum(lambda v: v, h[0])
