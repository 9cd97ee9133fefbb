import os

import pytest
import torch

os.environ.setdefault("MESHPROBE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test-tokens"))
torch.set_num_threads(min(2, torch.get_num_threads()))

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
