"""Fewer detail forwards: CFG truncation (guidance only in the early detail steps) and the first-block cache
(the blocks after the first skipped when the first block's residual barely changed), on the tiny model; the cost
model counts the same forwards."""

import re

import pytest
import torch
from safetensors.torch import load_file

from atlasvid_dist.cli.generate import DEFAULTS, build_config
from atlasvid_dist.config import AtlasConfig, VideoSpec, model_preset
from atlasvid_dist.config.generate import DetailSchedule
from atlasvid_dist.config.parallel import ParallelPlan
from atlasvid_dist.cost.model import RunSettings, estimate
from atlasvid_dist.models.block_cache import FirstBlockCache
from atlasvid_dist.pipeline.checkpoint import StepCheckpointer, step_key
from atlasvid_dist.pipeline.generate import RunInterrupted, TwoStageGenerator

SMALL = dict(res="256x256", frames=9, steps=4, proxy_steps=2, window="3,8,8", guidance=3.0, spatial_scale=2)
# On this run the first block's residual changes by 0.040, 0.040, 0.057, 0.115 from the cache's reference at the
# detail forwards after the first of each prompt (cond / uncond), with guidance in the first two steps: a
# threshold of 0.09 reuses three forwards and runs the last one, far from every decision's edge.
REUSE = 0.09


@pytest.fixture(scope="module")
def tiny():
    from atlasvid_dist.models.loading import load_components

    return load_components("tiny")


def config(tmp_path, name, **kw):
    values = {
        **DEFAULTS,
        **SMALL,
        "prompt": "a red ball rolling",
        "out": str(tmp_path / f"{name}.mp4"),
        "save_latents": str(tmp_path / f"{name}.safetensors"),
        **kw,
    }
    return build_config(values)


def run(cfg, comp, **kw):
    return TwoStageGenerator(cfg, components=comp, progress=False).run(**kw)


def latents(cfg) -> torch.Tensor:
    return load_file(cfg.save_latents)["latents"]


def detail_forwards(comp, cfg, on_commit=None):
    """Run ``cfg`` counting forwards on the detail grid: ([forwards, forwards that ran the last block], result)."""
    calls = {"embed": 0, "last_block": 0}

    def on_embed(_m, args):
        calls["embed"] += args[0].shape[3] == cfg.latent.h  # (B, C, f, h, w)

    def on_last(_m, args):
        calls["last_block"] += args[0].shape[1] == cfg.detail_grid.size  # (B, n, D)

    hooks = [
        comp.transformer.patch_embedding.register_forward_pre_hook(on_embed),
        comp.transformer.blocks[-1].ffn.register_forward_pre_hook(on_last),
    ]
    gen = TwoStageGenerator(cfg, components=comp, progress=False)
    gen.on_commit = on_commit
    try:
        result = gen.run()
    finally:
        for hook in hooks:
            hook.remove()
    return [calls["embed"], calls["last_block"]], result


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_counts_the_forwards_that_run():
    assert DetailSchedule.of(30, "noise", 0.7, 1.0).forwards(True) == 60
    s = DetailSchedule.of(30, "noise", 0.7, 0.5)
    assert (s.start, s.guided_until, s.run, s.guided, s.forwards(True), s.forwards(False)) == (0, 15, 30, 15, 45, 30)
    s = DetailSchedule.of(30, "proxy", 0.7, 0.5)  # starts at step 9: guided 9..14
    assert (s.start, s.run, s.guided, s.forwards(True)) == (9, 21, 6, 27)
    assert DetailSchedule.of(30, "proxy", 0.2, 0.1).guided == 0  # guidance would end before the first step run
    assert DetailSchedule.of(25, "proxy", 0.7, 1.0).run == 18  # round(17.5): the rule generate runs


def test_the_cost_model_counts_truncated_guidance_and_the_cache_memory():
    video, spec = VideoSpec.from_res("4k", frames=81), model_preset("wan2.1-1.3b")
    plan, method = ParallelPlan(workers=8, device="cuda", gpus=8), AtlasConfig(spatial_scale=3)

    def estimate_with(**run):
        return estimate(video, spec, method, plan, RunSettings(steps=30, **run), "h100")

    full, half = estimate_with(), estimate_with(detail_cfg_until=0.5)
    assert (full.detail_forwards, half.detail_forwards) == (60, 45)
    assert half.flops_per_video["detail_stage"] * 60 == full.flops_per_video["detail_stage"] * 45
    assert half.seconds["detail_stage"] == pytest.approx(full.seconds["detail_stage"] * 45 / 60)
    assert half.flops_per_step == full.flops_per_step  # a guided step still runs two forwards
    cached = estimate_with(detail_reuse=0.1)
    d = cached.memory["detail_stage"]
    assert d["block_cache"] == 2 * 2 * cached.tokens_per_rank * spec.dim * 2  # two residuals x two prompts, bf16
    assert "block_cache" not in full.memory["detail_stage"]
    assert any("decided at run time" in n for n in cached.notes)


# ------------------------------------------------------------------------------------------------ CFG truncation
def test_cfg_truncation_drops_the_unconditional_forward_of_the_late_steps(tmp_path, tiny):
    """Guidance in the first 2 of 4 detail steps: 6 detail forwards instead of 8, the same latents as full guidance
    after steps 1 and 2 (committed steps), other latents after step 3."""
    steps = {}
    for name, until in (("all", 1.0), ("half", 0.5)):
        cfg = config(tmp_path, name, detail_cfg_until=until, run_dir=str(tmp_path / name))
        ckpt, steps[name] = StepCheckpointer(tmp_path / name), {}

        def keep(stage, step, ckpt=ckpt, mine=steps[name]):
            if stage == "detail":
                mine[step] = ckpt.load(step_key(1, step))[0]["latents"]

        counts, result = detail_forwards(tiny, cfg, keep)
        assert counts == [result.detail_forwards["total"]] * 2 and result.detail_forwards["reused"] == 0
        assert counts[0] == {"all": 8, "half": 6}[name]
    assert torch.equal(steps["all"][1], steps["half"][1]) and torch.equal(steps["all"][2], steps["half"][2])
    assert not torch.equal(steps["all"][3], steps["half"][3])


# ------------------------------------------------------------------------------------------------ first-block cache
def test_change_is_the_relative_l1_of_the_first_residual():
    cache = FirstBlockCache(0.2)
    first = torch.ones(1, 4, 3)
    assert cache.change(first) == float("inf")  # no reference yet
    cache.store(first, torch.zeros(1, 4, 3))
    assert cache.change(first * 1.1) == pytest.approx(0.1)
    assert cache.reuse(first * 1.1) and not cache.reuse(first * 1.3)
    assert (cache.computed, cache.reused) == (1, 1)
    halves = FirstBlockCache(0.2, all_sum=lambda s: 2 * s)  # a rank's sums are added over ranks, then divided
    halves.store(first, first)
    assert halves.change(first * 1.1) == pytest.approx(0.1)


def test_a_threshold_nothing_passes_equals_no_cache(tmp_path, tiny):
    plain = config(tmp_path, "plain")
    never = config(tmp_path, "never", detail_reuse=1e-12)
    run(plain, tiny)
    assert run(never, tiny).detail_forwards == {"total": 8, "reused": 0}
    assert torch.equal(latents(plain), latents(never))


def test_reused_forwards_add_the_reference_residual(tmp_path, tiny):
    """Forwards whose first block changed less than the threshold run only that block (the last block is not
    called) and the run differs from the uncached one; one with a larger change runs every block."""
    cfg = config(tmp_path, "cached", detail_reuse=REUSE, detail_cfg_until=0.5)
    counts, result = detail_forwards(tiny, cfg)
    assert result.detail_forwards == {"total": 6, "reused": 3}
    assert counts == [6, 3]
    assert "3 of 6 detail forwards reused" in result.summary()
    plain = config(tmp_path, "plain", detail_cfg_until=0.5)
    run(plain, tiny)
    assert not torch.equal(latents(cfg), latents(plain))
    assert float((latents(cfg) - latents(plain)).abs().max()) < 0.5 * float(latents(plain).abs().max())


def test_the_model_reuses_exactly_what_the_reference_forward_added(tiny):
    from atlasvid_dist.config.method import AtlasConfig
    from atlasvid_dist.models.atlas_transformer import AtlasTransformer

    model = AtlasTransformer(tiny.transformer, AtlasConfig(mode="full"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tiny.transformer.config.in_channels, 3, 16, 16, generator=g)
    text = torch.randn(1, 8, tiny.transformer.config.text_dim, generator=g)
    t = torch.tensor([500.0])
    cache = FirstBlockCache(0.5)
    with torch.no_grad():
        ref = model(x, t, text)
        first = model(x, t, text, block_cache=cache)
        second = model(x, t, text, block_cache=cache)  # the same input: change 0, reused
    assert (cache.computed, cache.reused) == (1, 1)
    assert torch.equal(first, ref)
    assert torch.allclose(second, ref, atol=1e-5)


def test_resume_restores_the_cache(tmp_path, tiny):
    """A run interrupted after detail step 2 and resumed gives the uninterrupted cached run's latents and counts
    (without the cache in the checkpoint, step 3 would run every block)."""
    ref = config(tmp_path, "ref", detail_reuse=REUSE, detail_cfg_until=0.5)
    counts = run(ref, tiny).detail_forwards
    cfg = config(tmp_path, "resumed", detail_reuse=REUSE, detail_cfg_until=0.5, run_dir=str(tmp_path / "run"))
    gen = TwoStageGenerator(cfg, components=tiny, progress=False)
    gen.interrupt_at = ("detail", 2)
    with pytest.raises(RunInterrupted):
        gen.run()
    result = run(cfg, tiny, resume=True)
    assert result.resumed_from == "detail step 2" and result.detail_forwards == counts
    assert torch.equal(latents(cfg), latents(ref))


def test_plan_prints_the_detail_forwards(capsys):
    from atlasvid_dist.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "plan",
                "--model",
                "wan2.1-1.3b",
                "--res",
                "4k",
                "--frames",
                "81",
                "--gpus",
                "8",
                "--detail-cfg-until",
                "0.5",
            ]
        )
    assert e.value.code == 0
    assert re.search(r"\ndetail stage +30 steps, 45 forwards\n", capsys.readouterr().out)
