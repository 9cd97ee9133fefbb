"""The fused CPU kernels of MeSH's read (meshprobe.kernels) against the PyTorch ops they replace: the kernels
directly, then whole models (loss and every gradient) with and without them, and when they stand aside.
numba is a dependency: where it is missing these tests fail rather than skip."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_cfg
from test_model import MESH_CFGS, _loss_and_grads, randomized, tokens_for

from meshprobe import kernels


def reference_read(coef, values, rows, grad, fresh):
    """The read and its backward as plain PyTorch ops (what ChainedRead runs without the kernels)."""
    out = sum(c * v for c, v in zip(coef, values))
    for i in range(len(values)):
        rows[i] = coef[i] * grad if fresh else rows[i] + coef[i] * grad
    grad_coef = torch.stack([(grad * v).sum(-1, keepdim=True) for v in values])
    return out, grad_coef


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 9])  # 9 values: the 16-entry signature
@pytest.mark.parametrize("fresh", [True, False])
def test_kernels_equal_pytorch_ops(n, fresh, dtype):
    g = torch.Generator().manual_seed(n)
    shape = (3, 7, 20)
    values = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]
    coef = torch.randn(n, 3, 7, 1, generator=g, dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    rows = torch.randn(n + 1, *shape, generator=g, dtype=dtype)  # one row more than the read uses
    want_rows = rows.clone()
    want_out, want_grad_coef = reference_read(coef, values, want_rows, grad, fresh)
    assert kernels.usable(values, coef, grad, rows)
    out = kernels.read_forward(coef, values)
    grad_coef = kernels.read_backward(grad, coef, values, rows, fresh)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(grad_coef, want_grad_coef, **tol)
    torch.testing.assert_close(rows, want_rows, **tol)  # the unused last row untouched


def test_kernels_stand_aside_where_they_do_not_apply():
    x = torch.randn(2, 3, 4)
    coef = torch.randn(1, 2, 3, 1)
    assert not kernels.usable([x.mT.contiguous().mT], coef)  # not contiguous
    assert not kernels.usable([x.bfloat16()], coef.bfloat16())  # bf16 (autocast) runs PyTorch's ops
    assert not kernels.usable([x], coef.double())  # mixed dtypes
    assert not kernels.usable([x] * (kernels.MAX_VALUES + 1), coef)


def test_a_non_cpu_read_never_asks_for_numba(monkeypatch):
    def no(*_):
        raise AssertionError("numba was asked for on a non-CPU read")

    monkeypatch.setattr(kernels, "_kernels", no)
    meta = torch.empty(2, 3, 4, device="meta")  # stands in for a GPU tensor
    assert not kernels.usable([meta], torch.empty(1, 2, 3, 1, device="meta"))


@pytest.mark.parametrize("cfg", MESH_CFGS, ids=lambda c: c.layout)
def test_model_with_kernels_equals_model_without(cfg, monkeypatch):
    model = randomized(cfg).train()
    tokens = tokens_for(cfg)
    calls = []
    for name in ("read_forward", "read_backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    fused_logits, fused_grads = _loss_and_grads(model, tokens)
    reads = cfg.n_loops + 1
    assert calls.count("read_forward") == reads and calls.count("read_backward") == reads
    monkeypatch.setattr(kernels, "_compiled", False)
    calls.clear()
    plain_logits, plain_grads = _loss_and_grads(model, tokens)
    assert calls == []
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_environment_switch_turns_the_kernels_off():
    code = "from meshprobe import kernels; print(bool(kernels._kernels()))"
    env = {**os.environ, "MESHPROBE_KERNELS": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_grad_forward_uses_the_kernel_and_matches(monkeypatch):
    """Analysis runs forward under no_grad; the kernel's forward serves it too."""
    cfg = tiny_cfg(variant="mesh")
    model = randomized(cfg)
    tokens = tokens_for(cfg)
    calls = []
    real = kernels.read_forward
    monkeypatch.setattr(kernels, "read_forward", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = model(tokens)
        assert len(calls) == cfg.n_loops + 1
        monkeypatch.setattr(kernels, "_compiled", False)
        plain = model(tokens)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_a_numba_that_fails_warns_once_and_leaves_the_pytorch_ops(monkeypatch):
    def broken():
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(kernels, "_compiled", None)
    monkeypatch.setattr(kernels, "_check", broken)
    with pytest.warns(RuntimeWarning, match="fused CPU read is off .*no LLVM here"):
        assert kernels._kernels() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked again: no second warning
        assert kernels._kernels() is False
    assert not kernels.usable([torch.randn(2, 3)], torch.randn(1, 2, 1))
