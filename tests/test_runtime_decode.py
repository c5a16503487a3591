"""Decode spread over ranks: tiles balanced by area, every rank's tile stream blended by one writer in frame order,
the same frames as the one-process decode; on Ray, --workers 2 writes the same video and names tiles per rank."""

import numpy as np
import pytest
import torch

from atlasvid_dist.errors import InputError, RunFailure
from atlasvid_dist.pipeline.decode import DecodeTiling, TileBlender, decode_stream, decode_tiles, plan_tiles, vae_scale
from atlasvid_dist.runtime.decode import assign_tiles, stream_to_writer


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLWan

    from atlasvid_dist.models.tiny import TINY_VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_VAE_CONFIG).eval()


def test_assign_tiles_balances_area_and_covers_every_tile():
    tiles = plan_tiles((20, 30), DecodeTiling(tile=8, overlap=2))  # 3 x 4 tiles of unequal sizes
    per_rank = assign_tiles(tiles, 3)
    assert sorted(i for ids in per_rank for i in ids) == list(range(len(tiles)))
    area = [sum((tiles[i].y1 - tiles[i].y0) * (tiles[i].x1 - tiles[i].x0) for i in ids) for ids in per_rank]
    biggest = max((t.y1 - t.y0) * (t.x1 - t.x0) for t in tiles)
    assert max(area) - min(area) <= biggest, area
    assert assign_tiles(tiles, 3) == per_rank  # deterministic
    assert assign_tiles(tiles[:2], 4)[2:] == [[], []]  # more ranks than tiles: some decode nothing
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError):
            assign_tiles(tiles, bad)


def test_tiles_over_three_ranks_equal_the_one_process_decode(vae):
    lat = torch.randn(1, 16, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    tiling = DecodeTiling(tile=8, overlap=2)
    with torch.no_grad():
        want = np.concatenate(list(decode_stream(vae, lat, tiling)))
        blender = TileBlender.for_latents((3, 20, 24), tiling, vae_scale(vae))
        per_rank = assign_tiles(blender.tiles, 3)
        owner = {i: r for r, ids in enumerate(per_rank) for i in ids}
        streams = [decode_tiles(vae, lat, [blender.tiles[i] for i in ids], tiling) for ids in per_rank]
        got = []
        n = stream_to_writer(blender, [owner[i] for i in range(len(blender.tiles))], streams, got.append)
    got = np.concatenate(got)
    assert n == len(want) == 9 and got.shape == want.shape
    assert np.array_equal(got, want)  # the same tiles blended in the same order: the same bytes
    assert blender.max_held <= 4  # about one chunk of frames held, not the clip


def test_a_rank_that_stops_early_or_sends_a_foreign_tile_fails():
    tiles = plan_tiles((4, 4), DecodeTiling(tile=2, overlap=0))
    px = np.zeros((1, 16, 16, 3), np.float32)
    blender = TileBlender(tiles, frames=1, scale=8, pixel_hw=(32, 32))
    with pytest.raises(RunFailure, match="rank 1 ended"):
        stream_to_writer(blender, [0, 0, 1, 1], [iter([(0, 0, px), (1, 0, px)]), iter([(2, 0, px)])], print)
    blender = TileBlender(tiles, frames=1, scale=8, pixel_hw=(32, 32))
    with pytest.raises(RunFailure, match="rank 0 sent tile 3"):
        stream_to_writer(blender, [0, 0, 1, 1], [iter([(3, 0, px)]), iter([])], print)


def test_sequential_tiles_equal_the_tiles_together(vae):
    """Tile after tile per rank (one causal cache live) writes the same bytes as all tiles together; the blender
    then holds more frames than one chunk."""
    lat = torch.randn(1, 16, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    out = {}
    with torch.no_grad():
        for sequential in (False, True):
            tiling = DecodeTiling(tile=8, overlap=2, sequential=sequential)
            blender = TileBlender.for_latents((3, 20, 24), tiling, vae_scale(vae))
            per_rank = assign_tiles(blender.tiles, 2)
            owner = {i: r for r, ids in enumerate(per_rank) for i in ids}
            streams = [decode_tiles(vae, lat, [blender.tiles[i] for i in ids], tiling) for ids in per_rank]
            got = []
            stream_to_writer(blender, [owner[i] for i in range(len(blender.tiles))], streams, got.append)
            out[sequential] = (np.concatenate(got), blender.max_held)
    assert np.array_equal(out[True][0], out[False][0])
    assert out[True][1] >= out[False][1]
