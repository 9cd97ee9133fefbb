import itertools
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MESHPROBE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test-tokens"))
torch.set_num_threads(min(2, torch.get_num_threads()))

# ----------------------------------------------------------------------------------------------------------
# Float tolerances. Two float computations of one quantity that sum in another order (AVX2 or AVX-512
# kernels, 1 or 2 threads, a chunked or a fused path) round differently: a sum of n terms of size s moves by
# about eps * s * sqrt(n) (the roundings add like a random walk; the worst case is linear in n). A tolerance
# tuned on one CPU below that makes the suite red on another, so every float comparison takes its tolerance
# from these helpers (or from a float64 reference): c * eps * sqrt(n_terms) relative, the same times the
# scale absolute (elements near zero carry the rounding of the large terms that cancelled into them).
# ----------------------------------------------------------------------------------------------------------
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _max_abs(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().abs().max()) if x.numel() else 0.0
    arr = np.abs(np.asarray(x, dtype=np.float64))
    return float(arr.max()) if arr.size else 0.0


def f32_tol(reference, n_terms: int = 1, *, scale: float | None = None, layers: int = 1, c: float = 4.0,
            eps: float = EPS32) -> dict:
    """``dict(rtol=, atol=)`` for comparing a float32 result with `reference` (torch.testing.assert_close,
    np.testing.assert_allclose): each compared element is a sum of about `n_terms` float32 terms of size
    `scale` (default max|reference|; pass it when the terms are larger than the result), computed through
    `layers` such sums in a row (a network's depth: each layer's rounding is carried into the next).
    c = 4 standard deviations of the random walk, and no tolerance below a few ulps of the scale."""
    s = _max_abs(reference if scale is None else scale)
    rtol = c * eps * math.sqrt(max(n_terms, 1)) * max(layers, 1)
    return dict(rtol=rtol, atol=rtol * s)


def f64_tol(reference, n_terms: int = 1, **kw) -> dict:
    """:func:`f32_tol` for two computations done in float64 throughout."""
    return f32_tol(reference, n_terms, eps=EPS64, **kw)


def model_tol(reference, cfg, **kw) -> dict:
    """:func:`f32_tol` for two float32 forwards (or backwards) of one model of config `cfg` that may round
    differently: terms of its widest sum (the MLP's d_mlp), through every unrolled layer and the readout."""
    return f32_tol(reference, cfg.d_mlp, layers=cfg.n_layers + 1, **kw)


def approx_f32(expected, n_terms: int = 1, **kw):
    """pytest.approx with :func:`f32_tol`'s tolerance (``eps=EPS64`` for float64 computations)."""
    t = f32_tol(expected, n_terms, **kw)
    return pytest.approx(expected, rel=t["rtol"], abs=t["atol"])


# Every variant on a small looped layout, plus the unshared layouts; used by the model and hook tests.
ALL_VARIANTS = [
    "base", "residual", "anchor", "anchor_emb", "residual+anchor", "residual+anchor+anchor_emb",
    "anchor+anchor_emb", "static_comb", "dynamic_comb", "mesh",
]


def tiny_cfg(**overrides):
    from meshprobe import ModelConfig

    base = dict(d_model=32, n_heads=4, vocab_size=97, n_ctx=16, layout="1+2R3+1", variant="base")
    base.update(overrides)
    return ModelConfig(**base)


def all_configs():
    cfgs = [tiny_cfg(variant=v) for v in ALL_VARIANTS]
    cfgs += [tiny_cfg(variant="vanilla", layout="5"), tiny_cfg(variant="mesh", layout="1+2+2+1"),
             tiny_cfg(variant="base", layout="1+2+2+1"), tiny_cfg(variant="mesh", layout="0+2R2+0", mesh_slots=2)]
    return cfgs


@pytest.fixture(params=all_configs(), ids=lambda c: f"{c.layout}-{c.variant}")
def any_cfg(request):
    return request.param


def random_model(cfg, seed=0):
    """A model whose every parameter (biases, LayerNorms, routers included) is random, so no term hides."""
    from meshprobe import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.3))
    return model


def perturbed_model(cfg, seed=0):
    """A model at its usual init with biases, LayerNorms and comb scalars moved off their init values (a zero
    init would hide bias / LN-weight bugs), the rest as training starts."""
    from meshprobe import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "comb" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_tokens(cfg, batch=2, seq=None, seed=0):
    """[batch, seq] token ids (seq defaults to the model context) from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq or cfg.n_ctx), generator=g)


def shakespeare_text(n_plays: int, chars_each: int) -> str:
    """The first `chars_each` characters of the first `n_plays` texts of the built-in corpus, in its own order."""
    from meshprobe.data.sources import get_source

    plays = itertools.islice(get_source("shakespeare").items(), n_plays)
    return "".join(text[:chars_each] for _, text in plays)


def write_tiny_text_run(root, steps: int = 2, extra: str = ""):
    """A 40 kB Shakespeare corpus and a d16 `1+1R2+1` preset training on it under `root`; returns
    (corpus, preset). `extra` is appended to the [train] table (e.g. "save_every = 1\n")."""
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_text(1, 40_000), encoding="utf-8")
    preset = root / "p.toml"
    preset.write_text(
        '[model]\nd_model = 16\nn_heads = 2\nvocab_size = 300\nn_ctx = 32\nlayout = "1+1R2+1"\nvariant = "base"\n'
        f'[train]\ndata = "{corpus}"\nseq_len = 16\nbatch_size = 4\nsteps = {steps}\nlr = 3e-3\nlog_every = 1\n'
        'eval_every = 2\neval_batches = 1\n' + extra)
    return corpus, preset


def write_tiny_dory(folder, loops: int = 3, seed: int = 0):
    """A tiny random DoryForCausalLM (a looped LM transformers builds natively: hidden 64, vocab 128, 1 + 2 looped
    `loops` times + 1 layers) saved with save_pretrained in `folder` (no tokenizer); returns `folder`."""
    from transformers import DoryConfig, DoryForCausalLM

    torch.manual_seed(seed)
    DoryForCausalLM(DoryConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, n_input_layers=1, n_output_layers=1, n_recurrent_loops=loops,
        sliding_window=8, max_position_embeddings=128)).eval().save_pretrained(folder)
    return folder


# Runs meshprobe.cli.main on each argv in one fresh interpreter; every case must exit 2, and the script prints
# which heavy modules got imported (none, when bad input is answered before torch loads).
NO_TORCH_SCRIPT = """
import sys
from meshprobe.cli import main
for argv in {cases!r}:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2, (argv, rc)
print(sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules))
"""
