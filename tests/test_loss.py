"""The chunked cross-entropy from hidden states (meshprobe.loss) equals F.cross_entropy of the logits."""
import pytest
import torch
import torch.nn.functional as F
from conftest import f32_tol, tiny_cfg

from meshprobe import build_model
from meshprobe.evaluate import compute_loss
from meshprobe.loss import chunk_rows, linear_cross_entropy


def _reference(h, w, t):
    return F.cross_entropy((h @ w.T).flatten(0, -2).float(), t.flatten(), ignore_index=-100)


@pytest.mark.parametrize("n,vocab", [(25000, 50), (70, 1 << 14), (5, 7)])
def test_value_and_gradients_match_cross_entropy(n, vocab):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, 16, generator=gen, requires_grad=True)
    w = torch.randn(vocab, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[::3] = -100
    assert n > chunk_rows(vocab) or n == 5  # the first two cases span several chunks, the last chunk partial
    ours = linear_cross_entropy(h, w, t)
    (ours * 3.0).backward()  # a loss gradient other than 1 is carried through
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = _reference(h, w, t)
    (ref * 3.0).backward()
    # the loss sums the vocabulary (logsumexp) and then the rows; dh sums the vocabulary, dw the rows
    torch.testing.assert_close(ours, ref, **f32_tol(ref, n + vocab))
    torch.testing.assert_close(got[0], h.grad, **f32_tol(h.grad, vocab))
    torch.testing.assert_close(got[1], w.grad, **f32_tol(w.grad, n))
    with torch.no_grad():  # the forward-only path
        torch.testing.assert_close(linear_cross_entropy(h, w, t), ref.detach(), **f32_tol(ref, n + vocab))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("variant", ["vanilla", "mesh"])
def test_model_loss_paths_agree(variant):
    """forward "loss" (chunked), "both" (logits) and compute_loss with task-style targets agree, with grads."""
    cfg = tiny_cfg(variant=variant, layout="4" if variant == "vanilla" else "1+2R3+1")
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused = loss_and_grads(lambda: model(tokens, return_type="loss"))
    plain = loss_and_grads(lambda: model(tokens, return_type="both")[1])
    # the paths differ in the readout: the loss sums the vocabulary and the rows, each gradient carries that
    # difference back through the network's layers. Scale: the largest gradient, since some parameters'
    # gradients are sums of such terms that cancel to ~1e-6 of it (a router's, a LayerNorm's)
    n_terms = tokens.numel() + cfg.vocab_size + cfg.d_model
    torch.testing.assert_close(fused[0], plain[0], **f32_tol(plain[0], n_terms))
    scale = max(g.abs().max().item() for g in plain[1])
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, **f32_tol(b, n_terms, scale=scale, layers=cfg.n_layers))
    targets = torch.full_like(tokens, -100)
    targets[:, -3:] = tokens[:, :3]  # a task: answers at their own positions
    task = compute_loss(model, tokens, targets)
    logits = model(tokens)
    want = F.cross_entropy(logits[:, -3:].flatten(0, 1), tokens[:, :3].flatten())
    torch.testing.assert_close(task, want, **f32_tol(want, cfg.vocab_size + 6))
