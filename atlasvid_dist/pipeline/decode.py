"""Stage: Wan VAE decode with bounded memory — spatial tiles with overlap, streamed over time, blended by one writer.

Wan's decoder (diffusers' AutoencoderKLWan) is causal in time: it decodes one latent frame at a time and carries
a feature cache (the last two input frames of each causal conv). Here every spatial tile owns its cache, so

* one tile streamed over time is the unit of work (:func:`decode_tile_stream`); it needs only the latents and
  the VAE, so tiles can be decoded in different processes (ranks);
* :class:`TileBlender` takes tile chunks in any order of tiles (each tile's chunks in time order) and emits
  finished uint8 frames in frame order, holding only the frames between the slowest and the fastest tile;
* :func:`decode_tiles` advances many tiles together, one chunk at a time, equal-shaped tiles stacked as one batch
  (``DecodeTiling.batch``); :func:`decode_stream` is the one-process driver over it, so at most one chunk of
  frames (4 video frames per latent frame) is alive whatever the clip length.

Memory, honestly: the frames alive are bounded, but the decoder state is not small. Each tile's cache holds
605,312 B per latent cell in fp32 (302,656 in bf16) for the Wan2.1 VAE (measured:
:func:`decoder_state_bytes_per_cell`), i.e. ~39 GB bf16 for a whole 4K frame (270x480 cells) plus the tile
overlaps, ~157 GB at 8K. It does not grow with the frame count (H100, bf16, random Wan2.1 VAE weights, 720p,
tile 32 / overlap 4 = 24 tiles: peak 5.67 GiB for 13, 29 and 61 frames, ~0.17 s per frame), but a whole 8K
frame's state does not fit on one GPU: spread the tiles over ranks.

The library's modules are called as they are, with their own arguments (``post_quant_conv``, ``decoder`` with
``feat_cache``/``feat_idx``/``first_chunk``, exactly as its own ``_decode`` drives them); nothing is patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError, RunFailure, check
from ..geometry.tiles import tile_spans
from ..models.vae_cost import causal_conv_count, decode_latent_frame


@dataclass(frozen=True)
class DecodeTiling:
    """How the latent is cut for decoding (sizes in latent cells; one cell is 8x8 pixels for Wan2.1)."""

    tile: int = 32
    """Tile side in latent cells (the last tile of a row/column may be smaller)."""
    overlap: int = 4
    """Overlap of neighbouring tiles in latent cells, blended linearly; at most tile // 2."""
    chunk_frames: int = 1
    """Latent frames per chunk a tile stream yields (the decoder itself always runs one latent frame at a time)."""
    batch: int = 1
    """Equal-shaped tiles decoded together in one VAE call (stacked in the batch dimension). Their causal caches
    are live at once anyway when tiles advance together; what grows is one call's activations. CPU conv3d takes
    oneDNN only for batches above one (or large planes), so a small VAE decodes several times faster per tile."""
    sequential: bool = False
    """Decode one group of tiles after another (only its causal caches live; the blender then holds the clip's
    frames) instead of every tile advancing together (every tile's cache live; the cost model's decode_order)."""

    def __post_init__(self) -> None:
        check(_is_int(self.tile) and self.tile >= 1, "decode_tile", self.tile, "must be an integer >= 1")
        check(
            _is_int(self.overlap) and 0 <= self.overlap <= self.tile // 2,
            "decode_overlap",
            self.overlap,
            f"must be an integer in [0, decode_tile // 2 = {self.tile // 2}]",
        )
        check(
            _is_int(self.chunk_frames) and self.chunk_frames >= 1,
            "decode_chunk_frames",
            self.chunk_frames,
            "must be an integer >= 1",
        )
        check(_is_int(self.batch) and self.batch >= 1, "decode_batch", self.batch, "must be an integer >= 1")
        check(isinstance(self.sequential, bool), "decode_sequential", self.sequential, "must be true or false")


@dataclass(frozen=True)
class Tile:
    """One spatial tile: latent rows [y0, y1), columns [x0, x1), and how many cells it blends on each side."""

    index: int
    """Position in :func:`plan_tiles`' list (row-major)."""
    y0: int
    """First latent row."""
    y1: int
    """One past the last latent row."""
    x0: int
    """First latent column."""
    x1: int
    """One past the last latent column."""
    blend_top: int = 0
    """Cells shared with the tile above (ramped up over them)."""
    blend_bottom: int = 0
    """Cells shared with the tile below (ramped down over them)."""
    blend_left: int = 0
    """Cells shared with the tile on the left."""
    blend_right: int = 0
    """Cells shared with the tile on the right."""

    def pixel_box(self, scale: int) -> tuple[int, int, int, int]:
        """(py0, py1, px0, px1) in pixels of the uncropped frame."""
        return self.y0 * scale, self.y1 * scale, self.x0 * scale, self.x1 * scale


@dataclass(frozen=True)
class VaeScale:
    """Pixels per latent unit of one VAE."""

    temporal: int
    """Video frames per latent frame after the first (the first latent frame gives one video frame)."""
    spatial: int
    """Pixels per latent cell side."""

    def frames(self, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames`` latent frames."""
        return 1 + (latent_frames - 1) * self.temporal

    def chunk_frames(self, latent_start: int, latent_count: int) -> tuple[int, int]:
        """(first video frame, video frame count) of latent frames [latent_start, latent_start + latent_count)."""
        first = 0 if latent_start == 0 else self.frames(latent_start)
        return first, self.frames(latent_start + latent_count) - first


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------ geometry
def vae_scale(vae) -> VaeScale:
    """Temporal and spatial factors of an AutoencoderKLWan, from its structure (config defaults can disagree)."""
    cfg = vae.config
    temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
    spatial = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
    return VaeScale(temporal, spatial)


def plan_tiles(latent_hw: tuple[int, int], tiling: DecodeTiling) -> list[Tile]:
    """Row-major tiles covering a (h, w) latent; neighbours overlap by ``tiling.overlap`` cells."""
    h, w = latent_hw
    check(_is_int(h) and _is_int(w) and h >= 1 and w >= 1, "latent_hw", latent_hw, "must be two integers >= 1")
    rows = tile_spans(h, tiling.tile, tiling.overlap)
    cols = tile_spans(w, tiling.tile, tiling.overlap)
    tiles = []
    for r, (y0, y1) in enumerate(rows):
        for c, (x0, x1) in enumerate(cols):
            tiles.append(
                Tile(
                    len(tiles),
                    y0,
                    y1,
                    x0,
                    x1,
                    blend_top=rows[r - 1][1] - y0 if r > 0 else 0,
                    blend_bottom=y1 - rows[r + 1][0] if r + 1 < len(rows) else 0,
                    blend_left=cols[c - 1][1] - x0 if c > 0 else 0,
                    blend_right=x1 - cols[c + 1][0] if c + 1 < len(cols) else 0,
                )
            )
    return tiles


def crop_offset(pixel_hw: tuple[int, int], out_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(top, left) of the centred ``out_hw`` crop of a ``pixel_hw`` frame (1088 -> 1080 drops 4 rows each side)."""
    if out_hw is None:
        return 0, 0
    (ph, pw), (oh, ow) = pixel_hw, out_hw
    if not (_is_int(oh) and _is_int(ow) and 1 <= oh <= ph and 1 <= ow <= pw):
        raise InputError(f"out_hw={out_hw!r}: must be integers in [1, decoded size {ph}x{pw}] (rows, columns)")
    return (ph - oh) // 2, (pw - ow) // 2


# ------------------------------------------------------------------------------------------------ latents
def unnormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> VAE-space (x * std + mean per channel, from vae.config), as Wan's pipeline does.

    Computed in fp32 on the latents' device; the result is fp32.
    """
    c = latents.shape[1]
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=latents.device)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=latents.device)
    if mean.numel() != c or std.numel() != c:
        raise InputError(
            f"latents: {c} channels, but the VAE's latents_mean/latents_std have {mean.numel()}/{std.numel()}"
        )
    return latents.float() * std.view(1, c, 1, 1, 1) + mean.view(1, c, 1, 1, 1)


def _check_latents(vae, latents) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        raise InputError(
            f"latents: expected a tensor (1, C, f, h, w), got {getattr(latents, 'shape', type(latents).__name__)}"
        )
    b, c = latents.shape[:2]
    if b != 1:
        raise InputError(f"latents: batch {b}; decode one video at a time (batch 1)")
    if c != vae.config.z_dim:
        raise InputError(f"latents: {c} channels, the VAE's z_dim is {vae.config.z_dim}")
    if min(latents.shape[2:]) < 1:
        raise InputError(f"latents: empty shape {tuple(latents.shape)}")


# ------------------------------------------------------------------------------------------------ one tile
def _vae_placement(vae) -> tuple[torch.device, torch.dtype]:
    p = next(vae.parameters())
    return p.device, p.dtype


def tile_groups(tiles: Sequence[Tile], batch: int) -> list[list[Tile]]:
    """``tiles`` cut into groups of at most ``batch`` tiles of one shape (rows x columns), each group in the
    given order; groups ordered by their first tile."""
    by_shape: dict[tuple[int, int], list[list[Tile]]] = {}
    groups: list[list[Tile]] = []
    for t in tiles:
        runs = by_shape.setdefault((t.y1 - t.y0, t.x1 - t.x0), [])
        if not runs or len(runs[-1]) == batch:
            runs.append([])
            groups.append(runs[-1])
        runs[-1].append(t)
    return groups


class _TileDecoder:
    """Decodes equal-shaped tiles (one batch) one latent frame at a time, carrying the decoder's causal cache."""

    def __init__(self, vae, latents: torch.Tensor, tiles: Sequence[Tile]):
        self.vae, self.tiles = vae, list(tiles)
        self.device, self.dtype = _vae_placement(vae)
        self.z = torch.cat([latents[:, :, :, t.y0 : t.y1, t.x0 : t.x1] for t in self.tiles])  # (B, C, f, th, tw)
        self.cache: list = [None] * causal_conv_count(vae)

    @torch.no_grad()
    def frame(self, i: int) -> torch.Tensor:
        """Pixels of latent frame i: (B, 3, n, th*s, tw*s), n = 1 for i == 0 else the temporal factor; unclamped."""
        z = unnormalize_latents(self.vae, self.z[:, :, i : i + 1]).to(self.device, self.dtype)  # (B, C, 1, th, tw)
        return decode_latent_frame(self.vae, z, self.cache, first=(i == 0))


Chunk = tuple[int, int, np.ndarray]
"""(tile index, first video frame, pixels float32 (n, th, tw, 3)): one tile's decoded chunk."""


def decode_tile_stream(
    vae, latents: torch.Tensor, tile: Tile, tiling: DecodeTiling
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode one tile over time: yields (first video frame, pixels float32 (n, th*s, tw*s, 3)) in time order.

    ``latents`` are model-space (what the transformer produces), (1, C, f, h, w) on any device; they are
    unnormalised here, one latent frame of the tile at a time. Pixels are in about [-1, 1], not clamped (the
    blender clamps after blending, as diffusers' tiled decode does). Inputs are checked before the first chunk.
    """
    return ((start, px) for [(_, start, px)] in decode_group_stream(vae, latents, [tile], tiling))


def decode_group_stream(
    vae, latents: torch.Tensor, tiles: Sequence[Tile], tiling: DecodeTiling
) -> Iterator[list[Chunk]]:
    """Decode equal-shaped ``tiles`` together (one batch) over time: for each temporal chunk, a list of one
    (tile index, first video frame, pixels) per tile in the given order. Checked as decode_tile_stream."""
    _check_latents(vae, latents)
    h, w = latents.shape[3:]
    for tile in tiles:
        if not (0 <= tile.y0 < tile.y1 <= h and 0 <= tile.x0 < tile.x1 <= w):
            raise InputError(f"tile {tile}: outside the latent's {h}x{w} cells")
    if len({(t.y1 - t.y0, t.x1 - t.x0) for t in tiles}) != 1:
        raise InputError(f"decode group: tiles {[t.index for t in tiles]} differ in shape; see tile_groups")
    return _group_chunks(_TileDecoder(vae, latents, tiles), vae_scale(vae), latents.shape[2], tiling.chunk_frames)


def _group_chunks(dec: _TileDecoder, scale: VaeScale, latent_frames: int, chunk: int) -> Iterator[list[Chunk]]:
    t0 = dec.tiles[0]
    th, tw = (t0.y1 - t0.y0) * scale.spatial, (t0.x1 - t0.x0) * scale.spatial
    for start in range(0, latent_frames, chunk):
        count = min(chunk, latent_frames - start)
        first, n = scale.chunk_frames(start, count)
        parts = [dec.frame(i) for i in range(start, start + count)]
        px = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B, 3, n, th, tw)
        if tuple(px.shape) != (len(dec.tiles), 3, n, th, tw):
            raise RunFailure(
                f"tiles {[t.index for t in dec.tiles]}: the VAE decoded latent frames [{start}, {start + count}) "
                f"to {tuple(px.shape)}, expected ({len(dec.tiles)}, 3, {n}, {th}, {tw}) from its config"
            )
        del parts
        px = px.permute(0, 2, 3, 4, 1).float().cpu().numpy()  # (B, n, th, tw, 3)
        yield [(tile.index, first, pixels) for tile, pixels in zip(dec.tiles, px)]


def decode_tiles(vae, latents, tiles: Sequence[Tile], tiling: DecodeTiling) -> Iterator[Chunk]:
    """Decode ``tiles`` of model-space ``latents`` (1, C, f, h, w) in batches of equal-shaped tiles
    (``tiling.batch``), all advancing together: chunk k of every tile (groups in order) before chunk k + 1 of any;
    every tile's causal cache is live at once.

    ``tiling.sequential``: group after group instead, so only one group's caches are live (cost model:
    decode_order 'sequential'); a blender must then hold the clip's frames (``max_window=None``)."""
    groups = tile_groups(tiles, tiling.batch)
    if tiling.sequential:
        for group in groups:
            for chunk in decode_group_stream(vae, latents, group, tiling):
                for item in chunk:  # not `yield from` a list: Ray drives a streaming generator with send()
                    yield item
        return
    streams = [decode_group_stream(vae, latents, g, tiling) for g in groups]
    while streams:
        alive = []
        for stream in streams:
            chunk = next(stream, None)
            if chunk is not None:
                for item in chunk:  # not `yield from` a list: Ray drives a streaming generator with send()
                    yield item
                alive.append(stream)
        streams = alive


def decoder_state_bytes_per_cell(vae) -> float:
    """Bytes of causal-conv cache one tile holds per latent cell (measured on a 2x2-cell tile, 2 latent frames)."""
    dev, dtype = _vae_placement(vae)
    z = torch.zeros(1, vae.config.z_dim, 2, 2, 2, device=dev)
    dec = _TileDecoder(vae, z, [Tile(0, 0, 2, 0, 2)])
    dec.frame(0)
    dec.frame(1)
    return sum(c.numel() * c.element_size() for c in dec.cache if isinstance(c, torch.Tensor)) / 4.0


# ------------------------------------------------------------------------------------------------ blending
def _ramp(n: int, up: int, down: int) -> np.ndarray:
    """1-D weights of length n: rising over the first `up` pixels, falling over the last `down`, 1 between.

    A falling ramp over L pixels is 1 minus the rising ramp of the neighbour over the same L pixels, so the
    weights of two neighbours sum to 1 in their overlap.
    """
    w = np.ones(n, np.float32)
    if up:
        w[:up] = (np.arange(up, dtype=np.float32) + 0.5) / up
    if down:
        w[n - down :] = 1.0 - (np.arange(down, dtype=np.float32) + 0.5) / down
    return w


@dataclass(frozen=True)
class _Placement:
    """Where one tile's pixels land in the (cropped) output frame, with its blend weights."""

    dst: tuple[slice, slice]
    src: tuple[slice, slice]
    weight: np.ndarray  # (th', tw', 1) float32, already cut to src


class TileBlender:
    """Blends tile chunks into complete uint8 frames and emits them in frame order.

    ``add(tile_index, frame_start, pixels)`` takes one chunk from :func:`decode_tile_stream` (tiles in any
    order, each tile's chunks in time order) and returns the frames it completed, (n, H, W, 3) uint8 (n may be
    0), cropped (centred) to ``out_hw``. Frames are held (fp32 accumulators) only between the slowest and the
    fastest tile; with ``max_window`` a chunk that would make that more than ``max_window`` frames is refused.
    """

    def __init__(
        self,
        tiles: Sequence[Tile],
        *,
        frames: int,
        scale: int,
        pixel_hw: tuple[int, int],
        out_hw: tuple[int, int] | None = None,
        max_window: int | None = None,
    ):
        if not tiles or [t.index for t in tiles] != list(range(len(tiles))):
            raise InputError("TileBlender: tiles must be plan_tiles()' list (indices 0..n-1 in order)")
        check(_is_int(frames) and frames >= 1, "frames", frames, "must be an integer >= 1")
        check(
            max_window is None or (_is_int(max_window) and max_window >= 1),
            "max_window",
            max_window,
            "must be None or an integer >= 1",
        )
        self.tiles, self.frames, self.scale, self.max_window = list(tiles), frames, scale, max_window
        self.top, self.left = crop_offset(pixel_hw, out_hw)
        self.out_hw = out_hw or pixel_hw
        self._place = [self._placement(t) for t in self.tiles]
        self.progress = [0] * len(self.tiles)
        """Video frames received per tile."""
        self.emitted = 0
        """Frames emitted so far (all frames before this one are done)."""
        self.max_held = 0
        """Most frames held at once so far (accumulators alive)."""
        self._acc: dict[int, np.ndarray] = {}

    @classmethod
    def for_latents(
        cls,
        latent_fhw: tuple[int, int, int],
        tiling: DecodeTiling,
        scale: VaeScale,
        out_hw: tuple[int, int] | None = None,
        max_window: int | None = None,
    ) -> "TileBlender":
        """The blender for a (f, h, w) latent cut by ``plan_tiles`` (a writer needs no VAE, only its scale)."""
        f, h, w = latent_fhw
        return cls(
            plan_tiles((h, w), tiling),
            frames=scale.frames(f),
            scale=scale.spatial,
            pixel_hw=(h * scale.spatial, w * scale.spatial),
            out_hw=out_hw,
            max_window=max_window,
        )

    def _placement(self, t: Tile) -> _Placement | None:
        py0, py1, px0, px1 = t.pixel_box(self.scale)
        s = self.scale
        wy = _ramp(py1 - py0, t.blend_top * s, t.blend_bottom * s)
        wx = _ramp(px1 - px0, t.blend_left * s, t.blend_right * s)
        oh, ow = self.out_hw
        y0, y1 = max(py0 - self.top, 0), min(py1 - self.top, oh)  # tile box in output coordinates, clipped
        x0, x1 = max(px0 - self.left, 0), min(px1 - self.left, ow)
        if y0 >= y1 or x0 >= x1:
            return None  # entirely cropped away
        sy = slice(y0 + self.top - py0, y1 + self.top - py0)
        sx = slice(x0 + self.left - px0, x1 + self.left - px0)
        weight = (wy[sy, None] * wx[None, sx])[..., None]  # (th', tw', 1)
        return _Placement((slice(y0, y1), slice(x0, x1)), (sy, sx), weight)

    @property
    def done(self) -> bool:
        """True once every frame has been emitted."""
        return self.emitted == self.frames

    @property
    def held(self) -> int:
        """Frames held now (received from some tile, not yet emitted)."""
        return max(self.progress) - self.emitted

    def next_tile(self) -> int:
        """The tile to pull from next to keep the window small (least progress, lowest index first)."""
        return min(range(len(self.tiles)), key=lambda i: (self.progress[i], i))

    def add(self, tile_index: int, frame_start: int, pixels: np.ndarray) -> np.ndarray:
        """Accumulate one chunk; return the frames it completed (n, H, W, 3) uint8."""
        n = self._check_chunk(tile_index, frame_start, pixels)
        if self.max_window is not None and frame_start + n - self.emitted > self.max_window:
            raise RunFailure(
                f"decode: tile {tile_index} would run {frame_start + n - self.emitted} frames ahead of "
                f"the slowest tile (frame {self.emitted}); the window is {self.max_window} frames"
            )
        place = self._place[tile_index]
        for k in range(n):
            f = frame_start + k
            acc = self._acc.get(f)
            if acc is None:
                acc = self._acc[f] = np.zeros((*self.out_hw, 3), np.float32)
            if place is not None:
                acc[place.dst] += pixels[k][place.src] * place.weight
        self.progress[tile_index] = frame_start + n
        self.max_held = max(self.max_held, self.held)
        return self._emit()

    def _check_chunk(self, i: int, frame_start: int, pixels) -> int:
        if not _is_int(i) or not 0 <= i < len(self.tiles):
            raise InputError(f"decode chunk: tile index {i!r} not in [0, {len(self.tiles)})")
        if frame_start != self.progress[i]:
            raise InputError(
                f"decode chunk: tile {i} sent frame {frame_start}, expected frame {self.progress[i]} "
                f"(each tile's chunks must come in time order, without gaps or repeats)"
            )
        py0, py1, px0, px1 = self.tiles[i].pixel_box(self.scale)
        shape = getattr(pixels, "shape", None)
        if (
            not isinstance(pixels, np.ndarray)
            or pixels.ndim != 4
            or shape[1:] != (py1 - py0, px1 - px0, 3)
            or shape[0] < 1
            or frame_start + shape[0] > self.frames
        ):
            raise InputError(
                f"decode chunk: tile {i} pixels {shape}, expected an array (n, {py1 - py0}, "
                f"{px1 - px0}, 3) with 1 <= n <= {self.frames - frame_start}"
            )
        return shape[0]

    def _emit(self) -> np.ndarray:
        ready = min(self.progress)
        out = [to_uint8(self._acc.pop(f)) for f in range(self.emitted, ready)]
        self.emitted = ready
        if not out:
            return np.zeros((0, *self.out_hw, 3), np.uint8)
        return np.stack(out)  # (n, H, W, 3)


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """Float pixels in [-1, 1] (any shape) -> uint8, clamped and rounded (in place on ``frame``)."""
    np.clip(frame, -1.0, 1.0, out=frame)
    frame += 1.0
    frame *= 127.5
    return np.rint(frame, out=frame).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ one process
def decode_stream(
    vae, latents: torch.Tensor, tiling: DecodeTiling, out_hw: tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """Model-space Wan latents (1, C, f, h, w) -> uint8 frame chunks (n, H, W, 3) in frame order.

    All tiles advance together one chunk at a time (the blender's window is one chunk of video frames:
    ``chunk_frames * temporal`` at most), or with ``tiling.sequential`` one group of tiles after another (the
    blender holds the clip's frames). ``out_hw`` (rows, columns) crops the centre (1088 -> 1080 rows).
    Inputs are checked here, before the first frame is decoded.
    """
    _check_latents(vae, latents)
    scale = vae_scale(vae)
    window = None if tiling.sequential else tiling.chunk_frames * scale.temporal
    blender = TileBlender.for_latents(tuple(latents.shape[2:]), tiling, scale, out_hw=out_hw, max_window=window)
    return _drive(blender, decode_tiles(vae, latents, blender.tiles, tiling))


def _drive(blender: TileBlender, chunks: Iterator[Chunk]) -> Iterator[np.ndarray]:
    for index, start, px in chunks:
        frames = blender.add(index, start, px)
        del px
        if len(frames):
            yield frames
    if not blender.done:
        raise RunFailure(f"decode: the tiles ended at frame {blender.emitted} of {blender.frames}")
