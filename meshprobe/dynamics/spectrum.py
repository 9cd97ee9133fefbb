"""The spectrum of a loop step's Jacobian, matrix-free: top singular values and the spectral radius.

A step maps a state batch h [b, seq, d] to the next state [b, seq, d]; sequences do not interact, so its
Jacobian is block diagonal with one [seq*d, seq*d] block per sequence (positions inside a sequence do couple,
through attention). That block is never formed: the step is linearised once (one forward, `Linearized`) and
then applied to vectors, J v by a double vector-Jacobian product and J^T u by a vector-Jacobian product, both
reusing the one recorded graph (about one backward each; forward-mode AD is 3x slower on CPU here).

* singular values: Golub-Kahan-Lanczos bidiagonalisation (J V = U B) with full reorthogonalisation; the top
  singular values of the small bidiagonal B converge first.
* spectral radius: Arnoldi (J Q = Q H + r e^T) with full reorthogonalisation; the largest-modulus Ritz value of
  the small Hessenberg H. Right also when the dominant eigenvalues are a complex pair, where plain power
  iteration never settles.

All b sequences run in lock-step (one batched product per iteration); the Krylov bookkeeping is float64.
When a Krylov space closes (an invariant subspace: planted maps, repeated singular values), the iteration
restarts with a fresh random vector orthogonal to the basis, so multiplicities are found too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshprobe.errors import UserError

# A residual below this fraction of the largest coefficient so far is a closed Krylov space (the products run
# in float32: an exhausted space leaves a residual of ~1e-7 relative, round-off, not a direction).
BREAKDOWN = 1e-5


@dataclass
class Spectrum:
    """sigma [b, k]: top singular values of each sequence's Jacobian (descending); rho [b]: spectral radius
    estimate; eigvals [b, k]: the k largest-modulus eigenvalue estimates (complex); iters: Krylov steps run."""

    sigma: torch.Tensor
    rho: torch.Tensor
    eigvals: torch.Tensor
    iters: int


class Linearized:
    """The step linearised at h: `jvp(v)` = J v and `vjp(u)` = J^T u for batches [b, seq, d], one forward
    (products run on h's device and come back to the CPU, where the Krylov bookkeeping lives).

    Attention runs through PyTorch's math kernel here (the fused CPU kernel has no double backward)."""

    def __init__(self, step, h: torch.Tensor):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self._kernel = lambda: sdpa_kernel([SDPBackend.MATH])
        self.shape, self.dtype, self.device = h.shape, h.dtype, h.device
        with self._kernel():
            out, self._vjp = torch.func.vjp(step, h.detach())
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"step must map a state [b, seq, d] to one of the same shape; got {got} from "
                            f"{tuple(h.shape)}")
        self.out = out.detach()
        with self._kernel():
            _, self._jvp = torch.func.vjp(lambda u: self._vjp(u)[0], torch.zeros_like(out))

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        with self._kernel():
            return self._jvp(v.to(self.device, self.dtype).view(self.shape))[0].detach().cpu()

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        with self._kernel():
            return self._vjp(u.to(self.device, self.dtype).view(self.shape))[0].detach().cpu()


def _check(step, h, k, iters, seed):
    if not callable(step):
        raise UserError(f"step must be a function of a state batch, got {type(step).__name__}")
    if not isinstance(h, torch.Tensor) or h.ndim != 3 or not h.is_floating_point():
        raise UserError(f"h must be a float tensor [b, seq, d], got "
                        f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    n = h.shape[1] * h.shape[2]
    for name, value in (("k", k), ("iters", iters), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise UserError(f"{name}= must be a {'non-negative' if name == 'seed' else 'positive'} integer, "
                            f"got {value!r}")
    if k > n:
        raise UserError(f"k={k} is more than the {n} dimensions of one sequence's state (seq*d)")
    if iters < k:
        raise UserError(f"iters={iters} must be >= k={k} (the Krylov space must hold k directions)")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _orthogonalize(w: torch.Tensor, basis: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [b, n] minus its projection on the orthonormal basis (rows [b, n] each), twice (classical Gram-Schmidt
    repeated is as stable as modified); returns (w, coefficients [b, len(basis)])."""
    if not basis:
        return w, None
    q = torch.stack(basis, dim=1)  # [b, m, n]
    c = torch.einsum("bmn,bn->bm", q, w)
    w = w - torch.einsum("bmn,bm->bn", q, c)
    c2 = torch.einsum("bmn,bn->bm", q, w)
    return w - torch.einsum("bmn,bm->bn", q, c2), c + c2


def _next_vector(w, basis, scale, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit vector, its norm coefficient) from residual w [b, n]; rows whose residual is below BREAKDOWN x scale
    (a closed Krylov space) restart from a random vector orthogonal to the basis, with coefficient 0."""
    norm = w.norm(dim=-1)
    closed = norm <= BREAKDOWN * scale.clamp_min(1e-300)
    if closed.any():
        fresh = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        fresh, _ = _orthogonalize(fresh, basis)
        w = torch.where(closed[:, None], fresh, w)
        norm = torch.where(closed, torch.zeros_like(norm), norm)
        w = _unit(w)
        return w, norm
    return w / norm[:, None], norm


def singular_values(lin: Linearized, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Top-k singular values [b, k] of each sequence's Jacobian by Golub-Kahan-Lanczos (module docstring)."""
    b, n = lin.shape[0], lin.shape[1] * lin.shape[2]
    m = min(iters, n)
    v = _unit(torch.randn(b, n, generator=gen, dtype=torch.float64))
    us, vs, alphas, betas = [], [v], [], []
    scale = torch.zeros(b, dtype=torch.float64)
    for j in range(m):
        w = lin.jvp(v).reshape(b, n).double()
        w, _ = _orthogonalize(w, us)
        u, alpha = _next_vector(w, us, scale.clamp_min(w.norm(dim=-1)), gen)
        scale = torch.maximum(scale, alpha)
        us.append(u)
        alphas.append(alpha)
        if j == m - 1:
            break
        w = lin.vjp(u).reshape(b, n).double()
        w, _ = _orthogonalize(w, vs)
        v, beta = _next_vector(w, vs, scale, gen)
        scale = torch.maximum(scale, beta)
        vs.append(v)
        betas.append(beta)
    bidiag = torch.diag_embed(torch.stack(alphas, dim=1))
    if betas:
        bidiag = bidiag + torch.diag_embed(torch.stack(betas, dim=1), offset=1)
    return torch.linalg.svdvals(bidiag)[:, :k]


def eigenvalues(lin: Linearized, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """The k largest-modulus Ritz values [b, k] (complex, by decreasing modulus) of each sequence's Jacobian by
    Arnoldi (module docstring)."""
    b, n = lin.shape[0], lin.shape[1] * lin.shape[2]
    m = min(iters, n)
    q = [_unit(torch.randn(b, n, generator=gen, dtype=torch.float64))]
    hess = torch.zeros(b, m + 1, m, dtype=torch.float64)
    scale = torch.zeros(b, dtype=torch.float64)
    for j in range(m):
        w = lin.jvp(q[j]).reshape(b, n).double()
        scale = torch.maximum(scale, w.norm(dim=-1))
        w, c = _orthogonalize(w, q)
        hess[:, : j + 1, j] = c
        if j == m - 1:
            break
        nxt, norm = _next_vector(w, q, scale, gen)
        hess[:, j + 1, j] = norm
        q.append(nxt)
    ritz = torch.linalg.eigvals(hess[:, :m, :m])
    order = ritz.abs().argsort(dim=-1, descending=True)
    return ritz.gather(-1, order)[:, :k]


def spectrum(step, h: torch.Tensor, k: int = 4, iters: int = 100, seed: int = 0) -> Spectrum:
    """Top-k singular values and the spectral radius of the Jacobian of `step` at `h`, per sequence.

    step: a function mapping a state batch [b, seq, d] to the next state [b, seq, d], each sequence on its own
    (e.g. :func:`meshprobe.dynamics.loop_map`); h [b, seq, d]: where to linearise. k: how many singular values
    (and eigenvalues) to return; iters: Krylov steps (capped at seq*d, where the result is exact); seed: the
    start vectors. Returns a :class:`Spectrum` (sigma [b, k], rho [b], eigvals [b, k]) on the CPU, float64.
    Cost: one forward of `step`, then about 3 * iters backward-sized products.
    """
    _check(step, h, k, iters, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin = Linearized(step, h)
        sigma = singular_values(lin, k, iters, gen)
        eig = eigenvalues(lin, k, iters, gen)
    m = min(iters, h.shape[1] * h.shape[2])
    return Spectrum(sigma=sigma.cpu(), rho=eig[:, 0].abs().cpu(), eigvals=eig.cpu(), iters=m)
