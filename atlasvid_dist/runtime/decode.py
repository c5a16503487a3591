"""Decode spread over the detail ranks: spatial tiles (with overlap) streamed over time, blended by one writer.

The unit of work is pipeline.decode's tile stream (one spatial tile decoded latent frame by latent frame with its
own causal cache), so tiles are independent and need no collective at all:

* :func:`assign_tiles` gives every rank a balanced set of tiles (by pixel area, deterministic);
* pipeline.decode's ``decode_tiles`` runs on a rank: it advances all of its tiles together (equal-shaped tiles in
  one batch), one temporal chunk at a time, and yields ``(tile index, first video frame, pixels)`` chunks; the
  detail actor exposes it as a Ray streaming generator, so chunks travel through the object store while the rank
  decodes the next ones;
* :func:`stream_to_writer` runs on the driver: it always pulls from the rank that owns the tile furthest behind,
  so the blender holds about one temporal chunk of frames whatever the clip length, and it hands finished frames
  in frame order to one writer (the mp4 encoder).

No rank waits for another: a rank that finishes its tiles is done; the driver alone waits, with a timeout per
chunk that names the rank. :class:`RankDecoder` drives it all from the driver (tiles, streams, blender, writer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..cost.model import DECODE_CHUNKS_IN_STORE
from ..errors import InputError, RunFailure
from ..geometry.tiles import balance_by_area
from ..pipeline.decode import Chunk, Tile, TileBlender


def assign_tiles(tiles: Sequence[Tile], ranks: int) -> list[list[int]]:
    """Tile indices per rank, balanced by pixel area: largest tiles first, each to the least-loaded rank (ties:
    lowest rank). Every rank's list is sorted. Ranks may get no tile when there are fewer tiles than ranks."""
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise InputError(f"assign_tiles: ranks must be an integer >= 1, got {ranks!r}")
    if not tiles:
        raise InputError("assign_tiles: no tiles")
    ordered = sorted(tiles, key=lambda t: t.index)
    per_rank = balance_by_area([(t.y1 - t.y0) * (t.x1 - t.x0) for t in ordered], ranks)
    return [[ordered[i].index for i in ids] for ids in per_rank]


def stream_to_writer(
    blender: TileBlender, owner: Sequence[int], streams: Sequence[Iterator[Chunk]], write: Callable[[np.ndarray], None]
) -> int:
    """Blend chunks from every rank's stream and ``write`` finished frames (n, H, W, 3) uint8 in frame order.

    ``owner[i]`` is the rank (index into ``streams``) that decodes tile i. Pulls from the owner of the tile
    furthest behind (each rank's stream advances its tiles together, so its next chunk is that far behind too).
    Returns the frames written. A stream that ends early or sends a tile it does not own is a RunFailure.
    """
    if len(owner) != len(blender.tiles):
        raise InputError(f"stream_to_writer: owner has {len(owner)} entries for {len(blender.tiles)} tiles")
    written = 0
    while not blender.done:
        r = owner[blender.next_tile()]
        try:
            index, start, px = next(streams[r])
        except StopIteration:
            raise RunFailure(
                f"decode: rank {r} ended its stream with frames missing (frame {blender.emitted} of "
                f"{blender.frames} not complete)"
            ) from None
        if owner[index] != r:
            raise RunFailure(f"decode: rank {r} sent tile {index}, which rank {owner[index]} owns")
        frames = blender.add(index, start, px)
        del px
        if len(frames):
            write(frames)
            written += len(frames)
    return written


def ray_stream(ray, generator, rank: int, timeout_s: float) -> Iterator[Chunk]:
    """The chunks of one rank's Ray streaming generator, each awaited with a timeout that names the rank."""
    while True:
        ready, _ = ray.wait([generator], timeout=timeout_s)
        if not ready:
            raise RunFailure(f"decode: rank {rank} sent no chunk within {timeout_s:g} s")
        try:
            ref = next(generator)
        except StopIteration:
            return
        try:
            yield ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayError as exc:
            raise RunFailure(f"decode: rank {rank} failed: {exc}") from exc


def tile_owners(per_rank: Sequence[Sequence[int]], tiles: int) -> list[int]:
    """The rank of every tile index from :func:`assign_tiles`'s lists."""
    owner = [0] * tiles
    for r, ids in enumerate(per_rank):
        for i in ids:
            owner[i] = r
    return owner


@dataclass
class RankDecoder:
    """The driver's side of a distributed decode: the outputs of a run, decoded over the detail ranks."""

    ray: object
    """The ``ray`` module."""
    calls: object
    """``cluster.RayCalls`` of the run (its timeout bounds every chunk)."""
    ranks: list
    """Detail actors, by rank."""
    gen: object
    """The driver's TwoStageGenerator (tiling, bars, stage times)."""
    tiles: list[int] = field(default_factory=list)
    """Tiles every rank decoded for the output video (after :meth:`outputs`)."""
    peaks: list[dict] = field(default_factory=list)
    """Every rank's process peaks after the decode (``report.peak_memory``; after :meth:`outputs`)."""

    def outputs(self, cfg, latents, proxy) -> int:
        """Save the latents if asked, decode the video (and the proxy video) over the ranks; the video's bytes.
        The two videos are put in place together (neither stays when either fails)."""
        from ..pipeline.generate import _save_latents
        from ..pipeline.outputs import PendingOutputs

        if cfg.save_latents:
            _save_latents(cfg.save_latents, latents, cfg, proxy)
        with PendingOutputs() as pending:
            out_bytes = self.decode(
                latents, cfg.out, cfg.video.fps, (cfg.video.height, cfg.video.width), "decode", pending
            )
            if cfg.save_proxy and proxy is not None:
                self.decode(
                    proxy, cfg.save_proxy, cfg.video.fps / cfg.method.temporal_scale, None, "decode proxy", pending
                )
        self.peaks = [
            self.calls.call(a.peak_memory, f"detail rank {r} (peak memory)") for r, a in enumerate(self.ranks)
        ]
        return out_bytes

    def decode(self, latents, path: str, fps: float, out_hw, label: str, pending=None) -> int:
        """Tiles over the ranks (Ray streaming generators), blended and written in frame order here (one writer);
        the video's bytes."""
        from ..pipeline.decode import VaeScale

        t0 = time.perf_counter()
        tiling = self.gen.decode_tiling()
        scale = VaeScale(*self.calls.call(self.ranks[0].vae_scale, "detail rank 0 (VAE scale)"))
        blender = TileBlender.for_latents(tuple(latents.shape[2:]), tiling, scale, out_hw=out_hw)
        per_rank = assign_tiles(blender.tiles, len(self.ranks))
        streams = self._streams(latents, per_rank, tiling)
        size = self._write(
            blender, tile_owners(per_rank, len(blender.tiles)), streams, path, fps, out_hw, label, pending
        )
        if label == "decode":
            self.tiles = [len(ids) for ids in per_rank]
        self.gen.seconds[label] = time.perf_counter() - t0
        return size

    def _streams(self, latents, per_rank, tiling) -> list[Iterator[Chunk]]:
        """Every rank's chunks (an empty stream for a rank without tiles); the latents go once to the store."""
        from dataclasses import asdict

        ray = self.ray
        ref = ray.put(latents.cpu())  # once; every rank reads it from the object store
        return [
            ray_stream(
                ray,
                a.decode.options(
                    num_returns="streaming", _generator_backpressure_num_objects=DECODE_CHUNKS_IN_STORE * len(ids)
                ).remote(ref, ids, asdict(tiling)),
                r,
                self.calls.timeout_s,
            )
            if ids
            else iter(())
            for r, (a, ids) in enumerate(zip(self.ranks, per_rank))
        ]

    def _write(self, blender, owner, streams, path: str, fps: float, out_hw, label: str, pending) -> int:
        """Blend the streams into one mp4 at ``path``; its bytes."""
        from ..pipeline.video_io import Mp4Writer

        h, w = out_hw or blender.out_hw
        bar = self.gen.bar(blender.frames, f"{label} ({len(self.ranks)} workers)", "frame")
        with Mp4Writer(path, fps=fps, width=w, height=h, pending=pending, crf=self.gen.cfg.crf) as writer:

            def write(frames):
                writer.write(frames)
                bar.update(len(frames))

            stream_to_writer(blender, owner, streams, write)
        bar.close()
        return writer.written.stat().st_size
