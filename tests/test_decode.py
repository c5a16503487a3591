"""Tiled, streaming Wan VAE decode: equality with diffusers' decode, blending, any-order tiles, bounded memory."""

import tracemalloc

import numpy as np
import pytest
import torch

from atlasvid_dist.errors import ConfigError, InputError, RunFailure
from atlasvid_dist.pipeline.decode import (
    DecodeTiling,
    Tile,
    TileBlender,
    crop_offset,
    decode_group_stream,
    decode_stream,
    decode_tile_stream,
    decode_tiles,
    plan_tiles,
    tile_groups,
    to_uint8,
    unnormalize_latents,
    vae_scale,
)


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def latents(f: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 16, f, h, w, generator=torch.Generator().manual_seed(seed))


def run(vae, lat, tiling, out_hw=None) -> np.ndarray:
    return np.concatenate(list(decode_stream(vae, lat, tiling, out_hw=out_hw)))


@torch.no_grad()
def diffusers_decode(vae, lat) -> np.ndarray:
    """vae.decode of the unnormalised latents as float (n, H, W, 3) in [-1, 1]."""
    return vae.decode(unnormalize_latents(vae, lat)).sample[0].permute(1, 2, 3, 0).numpy()  # (n, H, W, 3)


def levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


# ------------------------------------------------------------------------------------------------ equality
def test_single_tile_equals_vae_decode(vae):
    """One tile covering everything: the frame-by-frame driving with our own cache is diffusers' decode."""
    lat = latents(3, 6, 8)
    ours = run(vae, lat, DecodeTiling(tile=8, overlap=0))
    ref = to_uint8(diffusers_decode(vae, lat))
    assert ours.shape == (9, 48, 64, 3) and ours.dtype == np.uint8
    assert levels(ours, ref).max() <= 1  # identical float ops; at most a rounding tie apart


def test_tiled_stream_equals_per_tile_decode_blended(vae):
    """Each tile streamed over time == vae.decode of that tile's latents; blending == a full-array reference."""
    lat = latents(3, 8, 8)
    tiling = DecodeTiling(tile=5, overlap=2)
    tiles = plan_tiles((8, 8), tiling)
    assert len(tiles) == 4  # 2x2
    acc, wsum = np.zeros((9, 64, 64, 3)), np.zeros((64, 64, 1))
    for t in tiles:
        px = diffusers_decode(vae, lat[..., t.y0 : t.y1, t.x0 : t.x1])
        wy = ref_ramp(t.y0, t.y1, [u for u in tiles if u.x0 == t.x0])
        wx = ref_ramp(t.x0, t.x1, [u for u in tiles if u.y0 == t.y0], axis="x")
        w = np.outer(wy, wx)[..., None]
        acc[:, t.y0 * 8 : t.y1 * 8, t.x0 * 8 : t.x1 * 8] += px * w
        wsum[t.y0 * 8 : t.y1 * 8, t.x0 * 8 : t.x1 * 8] += w
    ref = to_uint8((acc / wsum).astype(np.float32))
    assert levels(run(vae, lat, tiling), ref).max() <= 1


def per_tile(chunks) -> dict[int, list[tuple[int, np.ndarray]]]:
    out: dict[int, list] = {}
    for index, start, px in chunks:
        out.setdefault(index, []).append((start, px))
    return out


def test_batched_tiles_decode_as_one_at_a_time(vae):
    """Equal-shaped tiles stacked in one VAE call decode to what each tile gives alone (same chunks, same frames);
    the one-process stream is unchanged by the batch."""
    lat = latents(3, 9, 9)
    tiles = plan_tiles((9, 9), DecodeTiling(tile=4, overlap=1))  # 4x4, 4x3, 3x4 and 3x3 cells
    alone = per_tile(decode_tiles(vae, lat, tiles, DecodeTiling(tile=4, overlap=1)))
    batched = per_tile(decode_tiles(vae, lat, tiles, DecodeTiling(tile=4, overlap=1, batch=8)))
    assert sorted(alone) == sorted(batched) == [t.index for t in tiles]
    for i in alone:
        assert [s for s, _ in alone[i]] == [s for s, _ in batched[i]] == [0, 1, 5]
        for (_, a), (_, b) in zip(alone[i], batched[i]):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    one = run(vae, lat, DecodeTiling(tile=4, overlap=1))
    assert levels(run(vae, lat, DecodeTiling(tile=4, overlap=1, batch=8)), one).max() <= 1


@pytest.mark.parametrize("sequential", [False, True])
def test_decode_tiles_can_be_driven_with_send(vae, sequential):
    """A rank's decode is a Ray streaming generator, which Ray advances with send(value): every chunk must come
    through it (a `yield from` over a list breaks this; every distributed decode failed that way once)."""
    lat = latents(2, 9, 9)
    tiling = DecodeTiling(tile=4, overlap=1, batch=4, sequential=sequential)
    tiles = plan_tiles((9, 9), tiling)
    gen = decode_tiles(vae, lat, tiles, tiling)
    got = [next(gen)]
    while True:
        try:
            got.append(gen.send(object()))  # Ray sends a value, not None (None would fall back to next())
        except StopIteration:
            break
    assert sorted((i, s) for i, s, _ in got) == sorted((t.index, s) for t in tiles for s in (0, 1))


def test_tile_groups_are_equal_shaped_and_bounded():
    tiles = plan_tiles((9, 9), DecodeTiling(tile=4, overlap=1))  # spans 4, 4, 3 each way
    for batch in (1, 2, 3, 16):
        groups = tile_groups(tiles, batch)
        assert sorted(t.index for g in groups for t in g) == [t.index for t in tiles]
        assert all(1 <= len(g) <= batch and len({(t.y1 - t.y0, t.x1 - t.x0) for t in g}) == 1 for g in groups)
    shapes = {(t.y1 - t.y0, t.x1 - t.x0) for t in tiles}
    assert len(shapes) == 4 and len(tile_groups(tiles, 16)) == 4


def test_group_of_unequal_tiles_is_refused(vae):
    mixed = plan_tiles((9, 9), DecodeTiling(tile=4, overlap=1))[:3]  # 4x4, 4x4, 4x3
    with pytest.raises(InputError, match="differ in shape"):
        decode_group_stream(vae, latents(1, 9, 9), mixed, DecodeTiling(tile=4, overlap=1))


def ref_ramp(a: int, b: int, line, axis="y") -> np.ndarray:
    """Reference 1-D weight (pixels) of span [a, b) (latent cells) given the spans of its row/column `line`:
    a linear cross-fade over each overlap with a neighbour, 1 elsewhere (normalised by the caller)."""
    w = np.ones((b - a) * 8)
    for u in line:
        s, e = (u.y0, u.y1) if axis == "y" else (u.x0, u.x1)
        if s < a < e < b:  # neighbour before: overlap [a, e)
            n = (e - a) * 8
            w[:n] = (np.arange(n) + 0.5) / n
        if a < s < b < e:  # neighbour after: overlap [s, b)
            n = (b - s) * 8
            w[-n:] = 1 - (np.arange(n) + 0.5) / n
    return w


def test_tiled_close_to_untiled_decode_and_overlap_helps(vae):
    """Against untiled vae.decode on an 8x8-cell latent with 2x2 tiles. Stated tolerance: mean |diff| <= 1.5 uint8
    levels (measured ~0.8 with a 2-cell overlap). Random weights make tile borders show far more than Wan's
    trained VAE does (the max is ~35 levels at seams), so the max is not bounded here; blending must beat hard
    seams (overlap 0, measured ~2.5)."""
    lat = latents(3, 8, 8)
    ref = to_uint8(diffusers_decode(vae, lat))
    blended = levels(run(vae, lat, DecodeTiling(tile=5, overlap=2)), ref)
    hard = levels(run(vae, lat, DecodeTiling(tile=4, overlap=0)), ref)
    assert blended.mean() <= 1.5, blended.mean()
    assert blended.mean() < 0.6 * hard.mean(), (blended.mean(), hard.mean())


def test_crop_is_centred(vae):
    lat = latents(2, 6, 6)
    tiling = DecodeTiling(tile=3, overlap=1)
    full = run(vae, lat, tiling)
    crop = run(vae, lat, tiling, out_hw=(40, 44))
    assert crop.shape == (5, 40, 44, 3)
    assert np.array_equal(crop, full[:, 4:44, 2:46])
    assert crop_offset((1088, 1920), (1080, 1920)) == (4, 0)


# ------------------------------------------------------------------------------------------------ blender
def synthetic_chunks(tiles, frames, scale, seed=0):
    """Per tile, a list of (start, pixels) chunks of 1 then 4 frames, random values in [-1.2, 1.2]."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tiles:
        py0, py1, px0, px1 = t.pixel_box(scale)
        px = rng.uniform(-1.2, 1.2, (frames, py1 - py0, px1 - px0, 3)).astype(np.float32)
        out.append([(0, px[:1])] + [(s, px[s : s + 4]) for s in range(1, frames, 4)])
    return out


def blend(tiles, chunks, order, frames, scale, pixel_hw, out_hw=None, max_window=None):
    b = TileBlender(tiles, frames=frames, scale=scale, pixel_hw=pixel_hw, out_hw=out_hw, max_window=max_window)
    emitted = []
    for i in order:
        start, px = chunks[i].pop(0)
        emitted.append(b.add(i, start, px.copy()))
    assert b.done and b.held == 0
    return np.concatenate(emitted), b


def test_blender_any_tile_order_same_frames():
    tiles = plan_tiles((5, 7), DecodeTiling(tile=3, overlap=1))
    n_chunks = 3  # 9 frames
    lockstep = [i for _ in range(n_chunks) for i in range(len(tiles))]
    tile_major = [i for i in range(len(tiles)) for _ in range(n_chunks)]
    rng = np.random.default_rng(3)
    shuffled = list(tile_major)
    rng.shuffle(shuffled)  # any interleaving (each tile's chunks still in time order: pop(0))
    args = (9, 4, (20, 28))
    a, ba = blend(tiles, synthetic_chunks(tiles, 9, 4), lockstep, *args)
    b, bb = blend(tiles, synthetic_chunks(tiles, 9, 4), tile_major, *args)
    c, _ = blend(tiles, synthetic_chunks(tiles, 9, 4), shuffled, *args)
    assert a.shape == (9, 20, 28, 3)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert ba.max_held == 4 and bb.max_held == 9  # lockstep holds one chunk, tile-major the whole clip


def test_blender_weights_are_a_partition_of_unity():
    """Every tile sends the same constant frame: the blend must give it back everywhere (seams, corners, crop)."""
    for hw, tiling in (((9, 11), DecodeTiling(tile=4, overlap=2)), ((6, 6), DecodeTiling(tile=5, overlap=1))):
        tiles = plan_tiles(hw, tiling)
        b = TileBlender(tiles, frames=1, scale=8, pixel_hw=(hw[0] * 8, hw[1] * 8), out_hw=(hw[0] * 8 - 6, 40))
        value = 0.3  # -> round((0.3 + 1) * 127.5) = 166
        for t in tiles:
            py0, py1, px0, px1 = t.pixel_box(8)
            out = b.add(t.index, 0, np.full((1, py1 - py0, px1 - px0, 3), value, np.float32))
        assert out.shape == (1, hw[0] * 8 - 6, 40, 3)
        assert (out == 166).all()


def test_blender_refuses_gaps_repeats_wrong_shapes_and_runaway_tiles():
    tiles = plan_tiles((4, 4), DecodeTiling(tile=3, overlap=1))
    one = lambda t, n: np.zeros((n, (t.y1 - t.y0) * 2, (t.x1 - t.x0) * 2, 3), np.float32)  # noqa: E731
    b = TileBlender(tiles, frames=5, scale=2, pixel_hw=(8, 8))
    with pytest.raises(InputError, match="expected frame 0"):
        b.add(0, 1, one(tiles[0], 4))  # gap
    b.add(0, 0, one(tiles[0], 1))
    with pytest.raises(InputError, match="expected frame 1"):
        b.add(0, 0, one(tiles[0], 1))  # repeat
    with pytest.raises(InputError, match="pixels"):
        b.add(1, 0, np.zeros((1, 3, 3, 3), np.float32))  # wrong tile size
    with pytest.raises(InputError, match="pixels"):
        b.add(1, 0, one(tiles[1], 6))  # past the last frame
    w = TileBlender(tiles, frames=9, scale=2, pixel_hw=(8, 8), max_window=4)
    w.add(0, 0, one(tiles[0], 1))
    w.add(0, 1, one(tiles[0], 3))  # 4 frames ahead of the slowest tile: still inside the window
    with pytest.raises(RunFailure, match="window"):
        w.add(0, 4, one(tiles[0], 1))


def test_plan_tiles_geometry():
    tiles = plan_tiles((10, 7), DecodeTiling(tile=4, overlap=2))
    rows = sorted({(t.y0, t.y1) for t in tiles})
    assert rows == [(0, 4), (2, 6), (4, 8), (6, 10)]
    cols = sorted({(t.x0, t.x1) for t in tiles})
    assert cols == [(0, 4), (2, 6), (4, 7)]
    assert [t.index for t in tiles] == list(range(12))
    first, last = tiles[0], tiles[-1]
    assert (first.blend_top, first.blend_bottom, first.blend_left, first.blend_right) == (0, 2, 0, 2)
    assert (last.blend_top, last.blend_bottom, last.blend_left, last.blend_right) == (2, 0, 2, 0)
    assert plan_tiles((3, 3), DecodeTiling(tile=8, overlap=4)) == [Tile(0, 0, 3, 0, 3)]


@pytest.mark.parametrize(
    "kwargs",
    [dict(tile=0), dict(tile=4, overlap=3), dict(overlap=-1), dict(chunk_frames=0), dict(tile=4.0), dict(batch=0)],
)
def test_tiling_validation(kwargs):
    with pytest.raises(ConfigError):
        DecodeTiling(**kwargs)


def test_bad_latents_and_crop_refused_before_decoding(vae):
    t = DecodeTiling(tile=4, overlap=1)
    with pytest.raises(InputError, match="batch"):
        decode_stream(vae, torch.zeros(2, 16, 1, 4, 4), t)
    with pytest.raises(InputError, match="z_dim"):
        decode_stream(vae, torch.zeros(1, 8, 1, 4, 4), t)
    with pytest.raises(InputError, match="out_hw"):
        decode_stream(vae, torch.zeros(1, 16, 1, 4, 4), t, out_hw=(40, 32))
    with pytest.raises(InputError, match="outside"):
        decode_tile_stream(vae, torch.zeros(1, 16, 1, 4, 4), plan_tiles((6, 6), t)[-1], t)


# ------------------------------------------------------------------------------------------------ memory / streaming
def test_tile_stream_chunks(vae):
    lat = latents(4, 4, 4)
    tile = plan_tiles((4, 4), DecodeTiling(tile=4, overlap=0))[0]
    got = [(s, p.shape) for s, p in decode_tile_stream(vae, lat, tile, DecodeTiling(tile=4, overlap=0, chunk_frames=2))]
    assert got == [(0, (5, 32, 32, 3)), (5, (8, 32, 32, 3))]  # 1 + 4, then 4 + 4 video frames
    assert vae_scale(vae).frames(4) == 13


def peak_decode(vae, frames: int) -> tuple[int, float, int]:
    """(traced numpy/Python peak bytes, most latent frames decoded ahead of the emitted output, frames out) for
    one decode_stream run, its output consumed and dropped as it comes."""
    lat = latents(frames, 6, 12, seed=frames)
    tiling = DecodeTiling(tile=4, overlap=1)
    n_tiles = len(plan_tiles((6, 12), tiling))
    calls = [0]
    hook = vae.decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out, ahead = 0, 0
    try:
        tracemalloc.start()
        for chunk in decode_stream(vae, lat, tiling):
            out += len(chunk)
            latent_done = (out - 1) // 4 + 1  # latent frames whose video frames are all out
            ahead = max(ahead, calls[0] / n_tiles - latent_done)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        hook.remove()
    return peak, ahead, out


def test_decode_memory_does_not_grow_with_frames(vae):
    """Doubling the clip (9 -> 21 frames) must not raise the peak: measured with tracemalloc (numpy buffers and
    Python objects; holding the whole clip would add ~55 KB per frame here, +650 KB) and by counting decoder
    calls (a forward hook) against frames emitted: no tile's decoder runs ahead of the emitted frames."""
    p3, ahead3, n3 = peak_decode(vae, 3)
    p6, ahead6, n6 = peak_decode(vae, 6)
    assert (n3, n6) == (9, 21)
    frame_bytes = 48 * 96 * 3 * 4
    assert p6 <= p3 + 2 * frame_bytes, (p3, p6)  # measured equal; whole-clip buffering would add 12 frames
    assert p3 < 10 * frame_bytes  # window (<= 4 frames of fp32 accumulators) plus temporaries
    assert ahead3 == 0 and ahead6 == 0


def test_decode_stream_window_is_one_chunk(vae):
    lat = latents(5, 4, 6)
    tiling = DecodeTiling(tile=3, overlap=1, chunk_frames=2)
    blender = TileBlender.for_latents((5, 4, 6), tiling, vae_scale(vae), max_window=8)
    assert (blender.frames, len(blender.tiles)) == (17, 6)
    streams = [decode_tile_stream(vae, lat, t, tiling) for t in blender.tiles]
    out = []
    while not blender.done:
        i = blender.next_tile()
        out.append(blender.add(i, *next(streams[i])))
    assert blender.max_held <= 8  # chunk_frames * 4
    assert np.array_equal(np.concatenate(out), run(vae, lat, tiling))
