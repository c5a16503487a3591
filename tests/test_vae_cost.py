"""The VAE decode cost traced from a config on meta tensors (models.vae_cost) against real decodes, and the cost
model pricing the decode from it (no scaling by parameter count)."""

import dataclasses
import json

import pytest
import torch

from atlasvid_dist.config import VideoSpec, model_preset
from atlasvid_dist.config.model import TINY_VAE_DECODE, WAN21_VAE_DECODE, VaeDecodeCost
from atlasvid_dist.errors import ModelLoadError
from atlasvid_dist.models import vae_cost
from atlasvid_dist.models.loading import read_model_spec
from atlasvid_dist.models.memory import LiveStorages
from atlasvid_dist.models.tiny import TINY_VAE_CONFIG
from atlasvid_dist.pipeline.decode import Tile, _TileDecoder, decoder_state_bytes_per_cell

SHAPES = "atlasvid_dist/models/shapes"


def test_the_presets_are_the_traces_of_their_vaes():
    assert vae_cost.trace_decode({}) == WAN21_VAE_DECODE  # diffusers' defaults are Wan2.1's VAE
    assert vae_cost.trace_decode(TINY_VAE_CONFIG) == TINY_VAE_DECODE
    assert model_preset("tiny").vae_decode == TINY_VAE_DECODE
    assert model_preset("wan2.1-14b").vae_decode == WAN21_VAE_DECODE


@pytest.mark.parametrize("config", [TINY_VAE_CONFIG, "shapes"])
def test_traced_cache_equals_the_cache_of_a_real_decode(config):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(f"{SHAPES}/vae") if config == "shapes" else AutoencoderKLWan(**config)
    traced = vae_cost.trace_decode(dict(vae.config))
    assert traced.state_bytes_per_cell == decoder_state_bytes_per_cell(vae)


def test_traced_activations_equal_live_storages_of_a_real_cpu_decode():
    """The same storage count on real tensors (the CPU flash kernel materialises no score matrix): the traced
    per-pixel peak is that of a real steady-state frame at another tile size, within 2%."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE_CONFIG).eval()
    n = 12
    dec = _TileDecoder(vae, torch.zeros(1, 16, 3, n, n), [Tile(0, 0, n, 0, n)])
    with LiveStorages() as live:
        dec.frame(0)
        dec.frame(1)
        before = live.restart_peak()
        dec.frame(2)
    real = (live.peak - before) / (n * 8) ** 2
    assert real == pytest.approx(TINY_VAE_DECODE.bytes_per_tile_pixel, rel=0.02)


def test_attention_is_priced_fused_so_bytes_do_not_grow_with_the_tile():
    """Per tile pixel, a 16-cell and a 64-cell trace agree; with the score matrix materialised (the meta tensors'
    path for 4096 keys) the middle block's attention grows quadratically: 514 B per pixel at 64 cells, not 282."""
    small = vae_cost.trace_decode(TINY_VAE_CONFIG, cells=16)
    large = vae_cost.trace_decode(TINY_VAE_CONFIG, cells=64)
    assert large.bytes_per_tile_pixel == pytest.approx(small.bytes_per_tile_pixel, rel=0.02)


def test_a_model_folder_is_priced_with_its_own_vae():
    from diffusers import AutoencoderKLWan

    spec = read_model_spec(SHAPES)
    assert spec.vae_decode == vae_cost.trace_decode(AutoencoderKLWan.load_config(f"{SHAPES}/vae"))
    assert spec.vae_decode.bytes_per_tile_pixel < WAN21_VAE_DECODE.bytes_per_tile_pixel / 5


def test_a_vae_config_that_cannot_be_built_is_a_model_error(tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(SHAPES, folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    cfg["num_res_blocks"] = "two"  # diffusers builds no VAE from it
    (folder / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="vae/config.json"):
        read_model_spec(folder)


def test_the_cost_model_prices_the_decode_from_the_traced_cost():
    """Decode FLOPs, one call's activations and the tile caches follow the spec's VaeDecodeCost and the profile's
    convolution workspace, hand-computed at 512x512x33 on one CPU worker: a 64 x 64-cell latent cut into spans of
    32, 32 (from cell 28) and 8 (from cell 56) per axis, 9 tiles of 72 x 72 cells in all; a call stacks tiles of
    one shape only, so the largest call is the four 32 x 32-cell tiles (256 x 256 px each, not 8 of them: the
    batch of 8 is never filled), and all tiles' caches are live together."""
    from atlasvid_dist.config import AtlasConfig
    from atlasvid_dist.config.parallel import ParallelPlan
    from atlasvid_dist.cost import RunSettings, estimate
    from atlasvid_dist.cost.profiles import device_profile

    spec = model_preset("tiny")
    run = RunSettings(decode_batch=8, decode_order="together")
    video = VideoSpec.from_res("512x512", frames=33)
    plan = ParallelPlan(workers=1, device="cpu")
    report = estimate(video, spec, AtlasConfig(window=(3, 4, 4)), plan, run, "cpu")
    cost, ws = TINY_VAE_DECODE, device_profile("cpu").conv_workspace
    tile_px = 256 * 256
    assert report.memory["decode"]["activations"] == int(4 * tile_px * cost.bytes_per_tile_pixel)
    assert report.memory["decode"]["conv_workspace"] == int(4 * tile_px * ws * cost.conv_io_bytes_per_tile_pixel)
    assert report.memory["decode"]["tile_caches"] == 72 * 72 * cost.state_bytes_per_cell
    # host-side: the 64 x 64-cell latent (16 channels, 9 frames, fp32) and the tiles' stacked copies, each tile's
    # chunk of 4 fp32 RGB frames, and the blender's 4 frames of 512 x 512
    assert report.memory["decode"]["latents"] == (64 * 64 + 72 * 72) * 16 * 9 * 4
    assert report.memory["decode"]["decoded_chunks"] == 72 * 72 * 64 * 4 * 3 * 4
    assert report.memory["decode"]["blended_frames"] == 4 * 512 * 512 * 3 * 4
    assert report.flops_per_video["vae_decode"] == int(cost.flops_per_pixel * 72 * 72 * 64 * 33)  # overlaps twice
    bigger = estimate(
        video,
        dataclasses.replace(spec, vae_decode=VaeDecodeCost(566, 244, 17_392, 5363.8)),
        AtlasConfig(window=(3, 4, 4)),
        plan,
        run,
        "cpu",
    )
    for part in ("activations", "conv_workspace", "tile_caches"):
        assert bigger.memory["decode"][part] == pytest.approx(2 * report.memory["decode"][part], rel=1e-3)


@pytest.mark.parametrize("res,ranks,batch", [(512, 2, 8), (512, 1, 8), (1024, 2, 8), (768, 3, 4), (640, 4, 2)])
def test_the_largest_decode_call_is_the_one_a_rank_makes(res, ranks, batch):
    """A rank stacks only its own equal-shaped tiles (the runtime's area balance, then ``tile_groups``): the cost
    model's largest call equals the largest the runtime makes on any rank. At 512 px on 2 ranks a rank holds two
    of the four 32x32 tiles, so its call is two tiles, not four (the model priced four: 2x the decode's
    activations and workspace)."""
    from atlasvid_dist.config import AtlasConfig
    from atlasvid_dist.cost.model import RunSettings, _decode_groups, _geometry
    from atlasvid_dist.pipeline.decode import DecodeTiling, plan_tiles, tile_groups
    from atlasvid_dist.runtime.decode import assign_tiles

    video = VideoSpec(width=res, height=res, frames=33)
    geo = _geometry(video, model_preset("tiny"), AtlasConfig(mode="full"))  # the decode needs the grid only
    run = RunSettings(decode_tile=32, decode_overlap=8, decode_batch=batch)
    tiles = plan_tiles((res // 8, res // 8), DecodeTiling(tile=32, overlap=8, batch=batch))
    runtime = max(
        sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in group)
        for ids in assign_tiles(tiles, ranks)
        if ids
        for group in tile_groups([tiles[i] for i in ids], batch)
    )
    assert max(c * n for c, n in _decode_groups(geo, run, ranks)) == runtime


@pytest.mark.parametrize("order", ["together", "sequential"])
@pytest.mark.parametrize("res,ranks", [(512, 2), (1024, 2), (768, 3), (640, 4)])
def test_the_object_store_chunks_are_the_backpressure_the_runtime_asks_for(res, ranks, order):
    """On ranks the model counts the decoded chunks a rank may leave in Ray's object store: the streaming
    generator's backpressure (``DECODE_CHUNKS_IN_STORE`` objects per tile, as the runtime asks) times the chunks
    they can be: every tile's in turn when the tiles advance together, the largest tile's when they go one group
    after another. Held to the runtime's own tile deal."""
    from atlasvid_dist.config import AtlasConfig
    from atlasvid_dist.cost.model import DECODE_CHUNKS_IN_STORE, RunSettings, _geometry, _store_cells
    from atlasvid_dist.pipeline.decode import DecodeTiling, plan_tiles
    from atlasvid_dist.runtime.decode import assign_tiles

    video = VideoSpec(width=res, height=res, frames=33)
    geo = _geometry(video, model_preset("tiny"), AtlasConfig(mode="full"))
    run = RunSettings(decode_tile=32, decode_overlap=8, decode_order=order)
    tiles = plan_tiles((res // 8, res // 8), DecodeTiling(tile=32, overlap=8))
    cells = [
        [(tiles[i].y1 - tiles[i].y0) * (tiles[i].x1 - tiles[i].x0) for i in ids] for ids in assign_tiles(tiles, ranks)
    ]
    runtime = max(sum(c) if order == "together" else len(c) * max(c) for c in cells if c)
    assert _store_cells(geo, run, ranks, order) == DECODE_CHUNKS_IN_STORE * runtime


def test_the_runtime_streams_each_rank_with_the_modelled_backpressure():
    """Each rank's decode stream is asked for with ``DECODE_CHUNKS_IN_STORE`` objects per tile of backpressure (what
    the cost model's ``store_chunks`` counts); a rank without tiles gets no stream."""
    from types import SimpleNamespace

    from atlasvid_dist.cost.model import DECODE_CHUNKS_IN_STORE
    from atlasvid_dist.pipeline.decode import DecodeTiling
    from atlasvid_dist.runtime.decode import RankDecoder

    asked = []

    class Decode:
        def options(self, **kw):
            asked.append(kw)
            return SimpleNamespace(remote=lambda *a: iter(()))

    ranks = [SimpleNamespace(decode=Decode()) for _ in range(3)]
    fake_ray = SimpleNamespace(put=lambda x: "ref")
    dec = RankDecoder(ray=fake_ray, calls=SimpleNamespace(timeout_s=1.0), ranks=ranks, gen=None)
    streams = dec._streams(torch.zeros(1), [[0, 2, 3], [1], []], DecodeTiling(tile=32, overlap=8))
    assert len(streams) == 3
    assert [kw["_generator_backpressure_num_objects"] for kw in asked] == [
        3 * DECODE_CHUNKS_IN_STORE,
        DECODE_CHUNKS_IN_STORE,
    ]
    assert all(kw["num_returns"] == "streaming" for kw in asked)
