"""The chunked cross-entropy from hidden states (meshprobe.loss) equals F.cross_entropy of the logits."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg

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
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # the forward-only path
        torch.testing.assert_close(linear_cross_entropy(h, w, t), ref.detach(), rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("variant", ["vanilla", "mesh"])
def test_model_loss_paths_agree(variant):
    """forward "loss" (chunked), "both" (logits) and compute_loss with task-style targets agree, with grads."""
    cfg = tiny_cfg(variant=variant, layout="4" if variant == "vanilla" else "1+2R3+1")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused = loss_and_grads(lambda: model(tokens, return_type="loss"))
    plain = loss_and_grads(lambda: model(tokens, return_type="both")[1])
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    targets = torch.full_like(tokens, -100)
    targets[:, -3:] = tokens[:, :3]  # a task: answers at their own positions
    task = compute_loss(model, tokens, targets)
    logits = model(tokens)
    torch.testing.assert_close(task, F.cross_entropy(logits[:, -3:].flatten(0, 1), tokens[:, :3].flatten()))
