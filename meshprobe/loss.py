"""Mean next-token cross-entropy straight from the final hidden state, without the [tokens, vocab] logits.

    loss = linear_cross_entropy(h, model.unembed.weight, targets)   # = F.cross_entropy(h @ W.T, targets)

The logits of a training batch are the largest tensor of a small model's step (batch 16 x seq 128 x vocab 4096
= 32 MiB in fp32, against 1 MiB per hidden state), and F.cross_entropy passes over them about six times
(log-softmax forward; zero-filled gradient, scatter and log-softmax backward). Here the rows go in chunks of
~2 MiB of logits that stay in cache: each chunk's logits, loss and gradient (softmax - one-hot) are made and
used at once, and the gradients of h and of the unembedding are accumulated during the forward, so the
backward only scales them. The same technique as Liger-Kernel's fused linear cross-entropy, in plain PyTorch.
Its effect is vanilla's lead over HF GPTNeoXForCausalLM in `benchmarks/train_throughput.py` (README, Benchmarks).

The model uses it for `forward(return_type="loss")` and for the training loss whenever autocast is off (fp32,
the CPU default); under bf16 autocast the loss keeps the logits path (fp32 cross-entropy of bf16 logits, as
before). Same value and gradients as F.cross_entropy(h @ W.T, targets, ignore_index=-100) up to float
rounding (tested); differentiable once.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 19  # logits per chunk: 2 MiB in fp32, well inside a core's L2


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits, at least 32 rows so each chunk's matmuls stay efficient."""
    return max(32, CHUNK_ELEMENTS // max(vocab, 1))


def chunked_loss(h, weight, targets, grads: bool):
    """(mean loss, grad_h, grad_weight) for h [N, d], weight [V, d], targets [N]; the gradients only when
    `grads` (else None), scaled for a loss gradient of 1."""
    n = (targets != IGNORE_INDEX).sum()
    inv_n = 1.0 / n  # no defined target: nan, like F.cross_entropy's mean
    total = h.new_zeros((), dtype=torch.float32)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros_like(weight) if grads else None
    rows = chunk_rows(weight.shape[0])
    for a in range(0, h.shape[0], rows):
        hc, tc = h[a : a + rows], targets[a : a + rows]
        logits = (hc @ weight.T).float()
        valid = tc != IGNORE_INDEX
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, tc.clamp_min(0).unsqueeze(1)).squeeze(1)
        total += torch.where(valid, lse - picked, 0.0).sum()
        if not grads:
            continue
        # d loss / d logits = (softmax - one_hot(target)) / n on rows with a target, 0 elsewhere; in place
        g = logits.sub_(lse.unsqueeze(1)).exp_().mul_((valid * inv_n).unsqueeze(1))
        hit = valid.nonzero().squeeze(1)
        g[hit, tc[hit]] -= inv_n
        g = g.to(h.dtype)
        torch.mm(g, weight, out=grad_h[a : a + rows])
        grad_w.addmm_(g.T, hc)
    return total * inv_n, grad_h, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """mean over rows with target != -100 of logsumexp(h W^T) - (h W^T)[target]; h [N, d], weight [V, d]."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        loss, grad_h, grad_w = chunked_loss(h, weight, targets, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T [..., V] against targets [...] (-100 = no target), fp32."""
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"hidden states {tuple(h.shape)} and targets {tuple(targets.shape)} do not match")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return chunked_loss(h, weight, targets, grads=False)[0]
    return LinearCrossEntropy.apply(h, weight, targets)
