"""The cost model's FLOPs against torch's own FLOP counter on the tiny model (one forward, every mode).

SDPA runs on its math backend here so its matmuls are visible to FlopCounterMode (the fused CPU kernel is not
counted); the FLOPs are the same work either way.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from atlasvid_dist import AtlasConfig, AtlasTransformer
from atlasvid_dist.config import model_preset
from atlasvid_dist.cost.attention import layer_attention_flops
from atlasvid_dist.cost.model import embed_flops, linear_flops_per_layer
from atlasvid_dist.geometry import Grid
from atlasvid_dist.models.tiny import build_tiny_transformer

CASES = {
    "full": dict(mode="full"),
    "atlas-unshifted": dict(mode="atlas", window=(3, 8, 8), shift=False),
    "atlas-shifted-padded": dict(mode="atlas", window=(3, 8, 8), shift=True),
    "ultragen": dict(mode="ultragen", window=(3, 8, 8), shift=True, ultragen_pool=(1, 4, 4)),
}


def predicted(cfg: AtlasConfig, grid: Grid) -> int:
    spec = model_preset("tiny")
    per_layer = [
        linear_flops_per_layer(spec, grid.size)["total"]
        + layer_attention_flops(cfg, grid, spec.num_heads, spec.head_dim, layer=i, with_proxy=False)
        for i in range(spec.num_layers)
    ]
    return embed_flops(spec, grid.size) + sum(per_layer)


@pytest.mark.parametrize("name", list(CASES))
def test_cost_model_flops_equal_profiler_count(name):
    cfg = AtlasConfig(**CASES[name])
    spec = model_preset("tiny")
    model = AtlasTransformer(build_tiny_transformer(), cfg)
    x = torch.randn(1, 16, 9, 32, 32)  # token grid (9, 16, 16)
    text = torch.randn(1, spec.text_len, spec.text_dim)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500.0]), text)
    measured = counter.get_total_flops()
    expect = predicted(cfg, Grid(9, 16, 16))
    # the timestep embedder (~20 kFLOP) is the only work the model leaves out
    assert abs(measured - expect) / measured < 1e-3, (measured, expect)
