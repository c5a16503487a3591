"""Training modes (issue 10): stage 2 trains 'atlas' (windows + proxy) or 'ultragen' (windows + compressed global
branch, no proxy). In process, without DeepSpeed: one forward/backward of the training loss on the tiny model."""

import dataclasses

import pytest
import torch

from atlasvid_dist import AtlasTransformer
from atlasvid_dist.errors import ConfigError
from atlasvid_dist.models.lora import save_lora
from atlasvid_dist.pipeline.adapter_geometry import geometry_metadata, read_geometry, training_geometry
from atlasvid_dist.train.config import TrainConfig
from atlasvid_dist.train.train import FlowMatchingLoss, add_lora, load_train_config, parse_args

from .conftest import make_tiny_wan

ULTRA = dict(
    stage=2,
    mode="ultragen",
    width=128,
    height=128,
    frames=9,
    temporal_scale=2,
    spatial_scale=2,
    window=(3, 4, 4),
    lora_rank=4,
    lora_alpha=4.0,
)  # token grid (3, 8, 8); pool (1, 4, 4): 12 cells


def lora_grads(cfg: TrainConfig, method) -> tuple[float, dict]:
    """Loss and LoRA gradients of one stage-2 step (fixed inputs and LoRA init) with ``method``."""
    tr = make_tiny_wan(2)
    add_lora(tr, cfg, "stage2")
    with torch.no_grad():  # LoRA B starts at zero; make it non-zero so A gets gradients too
        for name, p in tr.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    tr.train()
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(1, 16, 3, 16, 16, generator=g) for _ in range(2))
    text = torch.randn(1, 8, 32, generator=g)
    loss = FlowMatchingLoss(AtlasTransformer(tr, method), cfg.stage, "stage2")(x0, noise, torch.tensor([0.5]), text)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}


def test_ultragen_stage2_step_trains_the_lora_through_the_global_branch():
    cfg = TrainConfig(**ULTRA)
    method = cfg.method_config()
    assert (method.mode, method.window) == ("ultragen", (3, 4, 4))
    loss, grads = lora_grads(cfg, method)
    assert torch.isfinite(torch.tensor(loss))
    assert grads and all(".lora_" in n for n in grads)
    assert all(torch.isfinite(gr).all() and gr.abs().max() > 0 for gr in grads.values())
    # the compressed global branch is in the graph: windows alone give other gradients
    _, local = lora_grads(cfg, dataclasses.replace(method, mode="atlas"))
    assert any(not torch.allclose(grads[n], local[n]) for n in grads if "attn1.to_q" in n)


def test_mode_is_validated_and_set_from_the_command_line():
    with pytest.raises(ConfigError, match="mode"):
        TrainConfig(**{**ULTRA, "mode": "sparse"})
    with pytest.raises(ConfigError, match="mode"):
        TrainConfig(**{**ULTRA, "stage": 1})  # ultragen has no proxy stage
    assert TrainConfig(**{**ULTRA, "mode": "atlas"}).method_config().mode == "atlas"
    cfg = load_train_config(parse_args(["--stage", "2", "--mode", "ultragen", "--data", "d", "--model", "tiny"]))
    assert cfg.mode == "ultragen" and cfg.method_config().mode == "ultragen"


def test_exported_adapter_records_the_training_mode(tmp_path):
    cfg = TrainConfig(**ULTRA)
    tr = make_tiny_wan(1)
    add_lora(tr, cfg, "stage2")
    path = save_lora(
        tr, "stage2", tmp_path / "adapter.safetensors", extra_metadata=geometry_metadata(training_geometry(cfg))
    )
    meta = read_geometry(path)
    assert {k: meta[k] for k in ("stage", "mode", "window", "ultragen_pool", "ultragen_weight")} == {
        "stage": 2,
        "mode": "ultragen",
        "window": [3, 4, 4],
        "ultragen_pool": [1, 4, 4],
        "ultragen_weight": 0.5,
    }
