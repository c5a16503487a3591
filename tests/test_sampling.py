"""Resumable sampling: stopping after any step k and restoring the saved state gives the identical result."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from safetensors.torch import load_file, save_file

from atlasvid_dist import ConfigError
from atlasvid_dist.pipeline.sampling import (
    SamplerConfig,
    denoise,
    guided,
    restore_scheduler,
    scheduler_state,
    start_scheduler,
)

TEMPLATES = {
    "unipc": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    "euler": FlowMatchEulerDiscreteScheduler(shift=3.0),
}


def velocity_fn():
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def v(x, t):
        return torch.einsum("ij,bj...->bi...", w, x) * (t.float().reshape(-1, 1, 1, 1, 1) / 1000 + 0.5)

    return v


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_resume_from_every_step_is_exact(kind, tmp_path):
    cfg = SamplerConfig(steps=6, flow_shift=3.0)
    x0 = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    v = velocity_fn()
    full = denoise(v, x0.clone(), start_scheduler(TEMPLATES[kind], cfg, "cpu"), cfg.steps)
    for k in range(1, cfg.steps):
        saved = {}

        def hook(done, lat, sched):
            if done == k:  # noqa: B023 - the hook runs inside this iteration's denoise
                tensors, meta = scheduler_state(sched)
                save_file({"latents": lat.contiguous(), **tensors}, tmp_path / "ck.safetensors")
                (tmp_path / "meta.json").write_text(json.dumps(meta))
                saved["ok"] = True  # noqa: B023

        denoise(v, x0.clone(), start_scheduler(TEMPLATES[kind], cfg, "cpu"), cfg.steps, on_step=hook, stop_after=k)
        assert saved
        tensors = load_file(tmp_path / "ck.safetensors")
        sched = start_scheduler(TEMPLATES[kind], cfg, "cpu")
        restore_scheduler(sched, tensors, json.loads((tmp_path / "meta.json").read_text()))
        resumed = denoise(v, tensors["latents"], sched, cfg.steps, start=k)
        assert torch.equal(resumed, full), f"resume from step {k} differs"


def test_interrupted_without_restore_differs():
    """The state matters: resuming UniPC without its history gives a different result (the test above can fail)."""
    cfg = SamplerConfig(steps=6)
    x0 = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    v = velocity_fn()
    full = denoise(v, x0.clone(), start_scheduler(TEMPLATES["unipc"], cfg, "cpu"), cfg.steps)
    part = denoise(v, x0.clone(), start_scheduler(TEMPLATES["unipc"], cfg, "cpu"), cfg.steps, stop_after=3)
    sched = start_scheduler(TEMPLATES["unipc"], cfg, "cpu")
    sched._step_index = 3
    assert not torch.equal(denoise(v, part, sched, cfg.steps, start=3), full)


def test_guidance_formula():
    c = lambda x, t: torch.ones_like(x)  # noqa: E731
    u = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert torch.equal(guided(c, u, 5.0)(torch.zeros(2), None), torch.full((2,), 5.0))
    assert guided(c, None, 5.0) is c


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(steps=4, guidance=-1), "guidance"),
        (dict(steps=4, flow_shift=0), "flow_shift"),
    ],
)
def test_bad_sampler_config(kw, field):
    with pytest.raises(ConfigError, match=field):
        SamplerConfig(**kw)
