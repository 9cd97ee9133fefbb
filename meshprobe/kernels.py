"""Fused CPU kernels for MeSH's memory read (numba), used by :class:`meshprobe.mesh.ChainedRead`.

A read is y = sum_i coef_i x_i over the n values x_i [tokens, d] written so far, one coefficient per token and
value (ChainedRead computes the coefficients, and their small tensors' gradients, with PyTorch ops). As
PyTorch ops the read is, forward, one pass over the output per value; backward, per value an in-place
multiply-add of the gradient into the value's gradient row and a batched dot product for the coefficient's
gradient (a slow CPU kernel, ~10x under memory speed). These kernels walk the tokens once: forward, each output
row is built from the values' rows while it stays in L1; backward, each gradient row is read once for all
values' dot products and gradient rows. Same arithmetic; only summation order differs (the dot products may be
reordered, `reassoc`, so they vectorize, and accumulate in float64). Alone at the bundled shape (L2 flushed)
they are ~1.7x (forward) and ~2.5x (backward) faster than the PyTorch ops; `benchmarks/mesh_cost.py` measures
the whole training step.

Used only where they apply (`usable`): CPU tensors of one float dtype, contiguous, numba importable, not inside
torch.compile; everywhere else ChainedRead runs its PyTorch ops (the reference: tests compare the two).
`MESHPROBE_KERNELS=torch` (read when the first read runs) turns them off. Numba compiles them on first use and
caches the machine code next to `_numba_read.py` (or in NUMBA_CACHE_DIR). They run on one thread: with two
torch threads they are level with the PyTorch ops (README, Benchmarks).
"""
from __future__ import annotations

import os
import warnings

import torch

MAX_VALUES = 32  # more values (K > 30) run the PyTorch ops
_compiled = None  # (forward, backward) once built; False where numba is missing or turned off


def usable(values, *others: torch.Tensor) -> bool:
    """Whether the fused kernels can run on a read of these values (else the caller uses PyTorch ops)."""
    dtype = values[0].dtype
    if not values[0].is_cpu or dtype not in (torch.float32, torch.float64) or len(values) > MAX_VALUES:
        return False  # checked first, so a GPU run never imports numba
    if torch.compiler.is_compiling() or not _kernels():
        return False
    for t in (*values, *others):
        if not (t.is_cpu and t.dtype == dtype and t.is_contiguous()):
            return False
    return True


def read_forward(coef: torch.Tensor, values) -> torch.Tensor:
    """sum_i coef[i] * values[i]; coef [n, batch, seq, 1], values [batch, seq, d]."""
    out = torch.empty_like(values[0])
    _kernels()[0](_rows(out), _columns(coef), _padded([_rows(v) for v in values]), len(values))
    return out


def read_backward(grad, coef, values, rows: torch.Tensor, fresh: bool) -> torch.Tensor:
    """Add (fresh: write) coef[i] * grad into rows[i] for every value; return d loss / d coef [n, batch, seq, 1]."""
    n = len(values)
    grad_coef = torch.empty_like(coef)
    _kernels()[1](_rows(grad), _columns(coef), _padded([_rows(v) for v in values]),
                  _padded([_rows(rows[i]) for i in range(n)]), n, fresh, _columns(grad_coef))
    return grad_coef


def _columns(coef: torch.Tensor):
    return coef.detach().view(coef.shape[0], -1).numpy()


def _rows(t: torch.Tensor):
    return t.detach().view(-1, t.shape[-1]).numpy()


def _padded(arrays: list) -> tuple:
    """A tuple of 8, 16 or 32 arrays (the kernels' compiled signatures; unused entries repeat the first): numba
    compiles one kernel per tuple length, and a needlessly long tuple slows the backward ~1.4x."""
    size = 8
    while size < len(arrays):
        size *= 2
    return tuple(arrays) + (arrays[0],) * (size - len(arrays))


def _kernels():
    """The two kernels, compiled (or loaded from numba's cache) and checked on a tiny read the first time they are
    asked for; False where numba is missing, fails, or `MESHPROBE_KERNELS=torch`. numba is imported only here."""
    global _compiled
    if _compiled is None:
        _compiled = False
        if os.environ.get("MESHPROBE_KERNELS", "numba") != "torch":
            try:
                from meshprobe import _numba_read

                _compiled = (_numba_read.forward, _numba_read.backward)
                _check()
            except ImportError:  # numba is a dependency; the PyTorch ops run wherever it is missing
                _compiled = False
            except Exception as e:  # a numba that cannot compile them: say so once, keep training
                _compiled = False
                warnings.warn(f"meshprobe: MeSH's fused CPU read is off ({type(e).__name__}: {e}); "
                              "using PyTorch ops", RuntimeWarning, stacklevel=2)
    return _compiled


def _check() -> None:
    """One read of two values (one token, d = 3) and its backward through the kernels, against known numbers."""
    coef = torch.tensor([[[[0.5]]], [[[2.0]]]])
    values = [torch.ones(1, 1, 3), torch.full((1, 1, 3), 3.0)]
    out = read_forward(coef, values)
    grad_coef = read_backward(torch.ones(1, 1, 3), coef, values, torch.zeros(2, 1, 1, 3), fresh=True)
    if out.flatten().tolist() != [6.5] * 3 or grad_coef.flatten().tolist() != [3.0, 9.0]:
        raise RuntimeError("the compiled kernels gave wrong results on a check read")
