"""MeSH's memory (paper §1.3): a buffer of B slots, written and read by per-step routers.

`MeshStep` holds one write-read cycle's routers and hooks (`entry.mesh` and `loop.{t}.mesh` of the model),
`MeshBuffer` the buffer of one forward pass, `ChainedRead` its fast read. The model (`meshprobe/model.py`)
calls `router_logits` as soon as a step's input exists and the step after the core.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from meshprobe.tl import HookPoint
from meshprobe.config import ModelConfig
from meshprobe.tl.compat import attached, run_hook


class ChainedRead(torch.autograd.Function):
    """One read y = sum_i coef[i] * values[i]: coef [n, batch, seq, 1] (one contiguous column per value, the
    broadcast that PyTorch's CPU kernels run fastest), n values [batch, seq, d].

    The reads of one forward pass are chained through `pending`, an expanded placeholder [N, batch, seq, d] that
    holds no memory. Backward, the chain's gradient is one real [N, batch, seq, d] buffer (made by the last read):
    each read adds coef_i * g into row i for every value it read, in place, and the read where value i was new
    (i >= first_new) hands row i on as that value's gradient; earlier reads never touch it again. A value read at
    every step thus gets its gradient summed in place, instead of one fresh tensor per read that autograd then
    adds up (on CPU, MeSH's extra cost over the base model is this memory traffic). Reads stay pure functions:
    nothing outside the graph is kept, so retain_graph and partial torch.autograd.grad calls are exact.
    The gradient of each coefficient is a batched dot product (no product tensor). Differentiable once.
    """

    @staticmethod
    def forward(ctx, pending, coef, first_new, *values):
        ctx.set_materialize_grads(False)
        ctx.first_new, ctx.pending_shape = first_new, pending.shape
        ctx.save_for_backward(coef, *values)
        out = values[0] * coef[0]
        for i, value in enumerate(values[1:], start=1):
            out.addcmul_(coef[i], value)
        return out, coef.new_zeros(()).expand(pending.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, pending):
        coef, *values = ctx.saved_tensors
        fresh = pending is None  # the last read of the chain starts the buffer; its rows are written, not added
        if fresh:
            pending = coef.new_empty(ctx.pending_shape)
        grad_coef = None
        if grad is not None:
            for i in range(len(values)):
                if fresh:
                    torch.mul(grad, coef[i], out=pending[i])
                else:
                    pending[i].addcmul_(grad, coef[i])
            g = grad.unsqueeze(-2)  # [batch, seq, 1, d]
            grad_coef = torch.stack([(g @ value.unsqueeze(-1)).squeeze(-1) for value in values])
        elif fresh:
            pending.zero_()
        new = [pending[i] if i >= ctx.first_new else None for i in range(len(values))]
        return (pending, grad_coef, None, *new)


class MeshBuffer:
    """The B-slot memory of one forward pass, in one of two exact representations.

    Every write adds w_tau (x) x_tau to all slots, so the buffer is always m = sum_tau w_tau (x) x_tau over the
    written values x_tau (first h_emb with w = e_0, i.e. m_0 = h_emb and the other slots empty; then the prelude
    output; then each step's h_m), and a read is  sum_b r_b m_b = sum_tau <r, w_tau> x_tau : one scalar per token
    per written value. The fast form keeps only the written values and weights, so no [batch, B, seq, d] tensor
    is built, and chains its reads (ChainedRead) so the backward is as small. The dense form keeps the buffer
    itself: `dense=True` (the model's choice when a hook is attached to any `*.mesh.hook_memory`) builds it at
    every step so the hook sees it, and a change the hook makes flows into this read and every later write and
    read. The two agree up to float rounding (summation order; tested, forward and gradients). Router weights
    come slot-major, [batch, B, seq], so every reduction over the B slots runs along an outer dim (PyTorch's CPU
    kernels for a short innermost dim are ~10x slower).

    Dtype: router weights are cast to the dtype of the written values and the read is elementwise, so under
    bf16 autocast the state stays float32 like the other variants' residual stream (never an autocast bf16
    matmul; before this class the read was a bf16 einsum).
    """

    def __init__(self, h_emb: torch.Tensor, slots: int, dense: bool, n_values: int) -> None:
        """n_values: how many values the pass writes in all, h_emb included (K + 2 for K loop steps)."""
        e0 = torch.zeros(1, slots, 1, dtype=h_emb.dtype, device=h_emb.device)
        e0[:, 0] = 1.0
        self.weights, self.values = [e0.expand(h_emb.shape[0], slots, h_emb.shape[1])], [h_emb]  # the fast form
        self.pending = h_emb.new_zeros(()).expand(n_values, *h_emb.shape)  # the read chain's placeholder
        self.n_read = 0  # values already handed to a read (their gradients come from that read)
        self.dense = (e0.unsqueeze(-1) * h_emb.unsqueeze(1)) if dense else None  # [batch, B, seq, d]

    def coefficients(self, w_read: torch.Tensor) -> torch.Tensor:
        """The read's coefficient of every written value, <r, w_tau> per token: [writes, batch, seq, 1], one
        contiguous column per value (a broadcast operand with a strided seq dim is slower)."""
        return (torch.stack(self.weights) * w_read).sum(dim=2).unsqueeze(-1)

    def write_read(self, w_write, x, w_read, hook_memory: HookPoint) -> torch.Tensor:
        """Write x [batch, seq, d] with weights w_write [batch, B, seq], then read with w_read [batch, B, seq]."""
        w_write, w_read = w_write.to(x.dtype), w_read.to(x.dtype)
        if self.dense is not None:
            self.dense = run_hook(hook_memory, self.dense + w_write.unsqueeze(-1) * x.unsqueeze(1))
            return (w_read.unsqueeze(-1) * self.dense).sum(dim=1)
        self.weights.append(w_write)
        self.values.append(x)
        if len(self.values) > self.pending.shape[0]:
            raise RuntimeError(f"MeshBuffer was sized for {self.pending.shape[0]} written values")
        out, self.pending = ChainedRead.apply(self.pending, self.coefficients(w_read), self.n_read, *self.values)
        self.n_read = len(self.values)
        return out


class MeshStep(nn.Module):
    """One write-read cycle. Routers read the step's INPUT state; the read happens after the write.

        w_w = softmax(W_write x + b),  w_r = softmax(W_read x + b)      [batch, seq, B]
        m_b <- m_b + w_w[..., b] * h_m                                   (writes accumulate)
        h_next = sum_b w_r[..., b] * m_b                                 (see MeshBuffer for how)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.write_router = nn.Linear(cfg.d_model, cfg.mesh_slots)
        self.read_router = nn.Linear(cfg.d_model, cfg.mesh_slots)
        self.hook_write_weights = HookPoint()  # [batch, seq, B]
        self.hook_read_weights = HookPoint()  # [batch, seq, B]
        self.hook_memory = HookPoint()  # [batch, B, seq, d], after this step's write

    def router_logits(self, router_input: torch.Tensor) -> torch.Tensor:
        """Both routers in one matmul -> logits in slot-major layout [batch, 2 (write, read), B, seq]. The model
        calls this as soon as the step's input exists (the matmul then reads it from cache), and `forward` later,
        after the core: the softmax and the hooks still come after the core's hooks."""
        weight = torch.cat([self.write_router.weight, self.read_router.weight])
        bias = torch.cat([self.write_router.bias, self.read_router.bias])
        return F.linear(router_input, weight, bias).unflatten(-1, (2, -1)).permute(0, 2, 3, 1)

    def forward(self, logits, h_m, memory: MeshBuffer) -> torch.Tensor:
        # Softmax over the slots in slot-major layout; the hooks see [batch, seq, B] views (.mT) of the weights.
        w_write, w_read = logits.softmax(dim=2).unbind(1)
        w_write = slot_major_hook(self.hook_write_weights, w_write)
        w_read = slot_major_hook(self.hook_read_weights, w_read)
        return memory.write_read(w_write, h_m, w_read, self.hook_memory)


def slot_major_hook(hook: HookPoint, w: torch.Tensor) -> torch.Tensor:
    """A router-weight hook sees (and may replace) the [batch, seq, B] view of slot-major w; idle, no views."""
    return hook(w.mT).mT if attached([hook]) else w
