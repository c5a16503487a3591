"""The memory model against live tensor bytes measured on CPU (``models.memory.LiveStorages``: on CPU what CUDA's
``max_memory_allocated`` is on a GPU, without the host allocator's cache or oneDNN's private copies, which a
process's RSS holds besides: ``benchmarks/bench_memory.py`` measures those).

The sampler's share is traced exactly; the detail stage of the tiny model, on one process and on a rank of two,
is held to ±15% of the cost model's detail phase (what it allocates: every part but the weights). None of these
cases fitted a constant of the model (its activation widths come from H100 runs of Wan2.1).
"""

from __future__ import annotations

import pytest
import torch

from atlasvid_dist.cli.generate import build_config
from atlasvid_dist.config.parallel import ParallelPlan
from atlasvid_dist.cost.model import SAMPLER_LATENT_COPIES
from atlasvid_dist.models.memory import LiveStorages
from atlasvid_dist.models.tiny import build_tiny_scheduler
from atlasvid_dist.pipeline import sampling
from atlasvid_dist.pipeline.generate import TwoStageGenerator

from ._dist import run_ranks

RESIDENT = ("weights", "text_encoder_weights", "vae_weights", "total")
"""Parts of a phase that exist before the stage (loaded with the model) or sum the others."""
TOLERANCE = 0.15


def _latent_copies_at_forwards(guidance: bool, steps: int = 6) -> list[float]:
    """Latent-sized tensors alive as each forward starts, over a whole denoising loop with the project's sampler
    (Wan's UniPC scheduler); the forwards are stand-ins that return a new velocity."""
    sched = sampling.fresh_scheduler(build_tiny_scheduler(), 3.0)
    sched.set_timesteps(steps)
    shape, seen = (1, 16, 5, 8, 8), []
    with LiveStorages() as live:

        def forward(x, t):
            seen.append(live.live)
            return torch.randn_like(x)

        velocity = sampling.guided(forward, forward if guidance else None, 5.0)
        sampling.denoise(velocity, torch.randn(shape), sched, steps)  # nothing else holds the first latents
    return [n / torch.empty(shape).nbytes for n in seen]


def test_the_sampler_holds_the_latent_copies_the_cost_model_counts():
    for guidance in (True, False):
        seen = _latent_copies_at_forwards(guidance)
        # cond's velocity is held while uncond runs; the scheduler's own small tensors are a fraction of a copy
        assert max(seen) == pytest.approx(SAMPLER_LATENT_COPIES + guidance, abs=0.05)
        assert seen[-1] == max(seen)  # the steady state, reached by the third step


def _generator(tmp_path, res: str, frames: int) -> TwoStageGenerator:
    out = str(tmp_path / "o.mp4")
    cfg = build_config(
        dict(model="tiny", prompt="a test", res=res, frames=frames, window="3,4,4", steps=3, proxy_steps=1, out=out)
    )
    return TwoStageGenerator(cfg, progress=False)


def _inputs(gen: TwoStageGenerator):
    comp = gen.load()
    text = gen.encode(comp)
    with torch.no_grad():
        return comp, text, gen.stage1(comp, text, None, None)


def _modelled(gen: TwoStageGenerator, workers: int) -> int:
    """Bytes the cost model says the detail stage allocates on its heaviest rank (the sharding the ranks run)."""
    plan = ParallelPlan(workers=workers, device="cpu", window_order="thw", shift_exchange="kv")
    phase = gen.preflight(workers=workers, plan=plan).memory["detail_stage"]
    return sum(v for k, v in phase.items() if k not in RESIDENT)


def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (containers, dataclasses, attributes)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return sum(_tensor_bytes(v, seen) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0


def test_the_attention_geometry_one_process_keeps_is_the_modelled_one(tmp_path):
    """The RoPE and index tables of every layer grid a forward builds (and the run keeps) against the cost model's
    ``geometry`` entry: within 10%."""
    from atlasvid_dist.config import model_preset
    from atlasvid_dist.geometry.grid import ProxyGeometry
    from atlasvid_dist.models.attention.detail import AttentionGeometry
    from atlasvid_dist.models.rope import Rotary3D

    gen = _generator(tmp_path, "512x512", 33)
    method, grid = gen.cfg.method, gen.cfg.detail_grid
    proxy = ProxyGeometry(grid, method.temporal_scale, method.spatial_scale)
    spec = model_preset("tiny")
    geometry = AttentionGeometry(method, grid, Rotary3D(spec.head_dim), "cpu", proxy.grid, proxy.scales)
    for layer in range(spec.num_layers):
        geometry.window_rows(layer, proxy.grid.size)
    measured = _tensor_bytes(geometry, set())
    plan = ParallelPlan(workers=1, device="cpu")
    modelled = gen.preflight(workers=1, plan=plan).memory["detail_stage"]["geometry"]
    assert abs(measured / modelled - 1) <= 0.10, (measured, modelled)


def test_one_process_detail_stage_peak_is_the_modelled_one(tmp_path):
    gen = _generator(tmp_path, "512x512", 33)
    comp, text, proxy = _inputs(gen)
    with torch.no_grad(), LiveStorages() as live:
        gen.stage2(comp, text, proxy, None, None)
    ratio = live.peak / _modelled(gen, 1)
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, f"measured {live.peak} B = {ratio:.3f} x the model"


def _rank_peak(rank: int, world: int, folder: str) -> int:
    import pathlib

    import torch.distributed as dist

    from atlasvid_dist.runtime.detail import denoise_rank

    gen = _generator(pathlib.Path(folder), "512x512", 33)  # nothing is written there
    comp, text, proxy = _inputs(gen)
    with torch.no_grad(), LiveStorages() as live:
        denoise_rank(gen, comp, text, proxy, rank, world, dist.group.WORLD, window_order="thw", shift_exchange="kv")
    return live.peak


@pytest.mark.slow  # two processes, each loads the model and runs stage 2
def test_a_ranks_detail_stage_peak_is_the_modelled_one(tmp_path):
    peaks = run_ranks(_rank_peak, 2, str(tmp_path), timeout=300)
    ratio = max(peaks) / _modelled(_generator(tmp_path, "512x512", 33), 2)
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, f"measured {peaks} B = {ratio:.3f} x the model"


@pytest.mark.slow  # a 512x512x33 decode under the dispatch mode
def test_one_process_decode_peak_is_the_modelled_one(tmp_path):
    """The tiled decode's live tensors (9 tiles, the four 32 x 32-cell ones stacked in one call, all advancing
    together) against the model's decode phase: the VAE's traced activations, every tile's causal cache, the
    latents and the decoded chunks (not the convolution library's workspace or the blender's numpy frames, which
    are no tensors)."""
    gen = _generator(tmp_path, "512x512", 33)
    comp = gen.load()
    latents = torch.randn(1, 16, 9, 64, 64, generator=torch.Generator().manual_seed(0))
    with LiveStorages() as live:
        gen.decode(comp, latents, str(tmp_path / "d.mp4"), 16.0, None)
    plan = ParallelPlan(workers=1, device="cpu")
    phase = gen.preflight(workers=1, plan=plan).memory["decode"]
    modelled = sum(phase[k] for k in ("activations", "tile_caches", "latents", "decoded_chunks"))
    ratio = live.peak / modelled
    assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, f"measured {live.peak} B = {ratio:.3f} x the model"
