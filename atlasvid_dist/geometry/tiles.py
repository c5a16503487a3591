"""How the decode cuts a latent into tiles and which rank decodes which: one cut and one balance for the
pipeline (``pipeline.decode.plan_tiles``), the runtime (``runtime.decode.assign_tiles``) and the cost model's
price of a rank's decode."""

from __future__ import annotations

from typing import Sequence


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of length `tile` every `tile - overlap` cells along one axis; the last one is clipped at
    `size`.

    Neighbours share exactly `overlap` cells, and the last span is longer than `overlap`, so no cell is in more
    than two spans and linear ramps over the shared cells form a partition of unity.
    """
    spans, start = [], 0
    while True:
        end = min(start + tile, size)
        spans.append((start, end))
        if end == size:
            return spans
        start += tile - overlap


def balance_by_area(areas: Sequence[int], ranks: int) -> list[list[int]]:
    """Positions in ``areas`` per rank, balanced by area: largest first, each to the least-loaded rank (ties: the
    lower position, then the lowest rank). Every rank's list is sorted; ranks may get none."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(areas)), key=lambda i: (-areas[i], i)):
        r = min(range(ranks), key=lambda k: (load[k], k))
        load[r] += areas[i]
        out[r].append(i)
    return [sorted(ids) for ids in out]


__all__ = ["balance_by_area", "tile_spans"]
