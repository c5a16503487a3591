"""Which rank decodes which tile: one balance for the runtime (``runtime.decode.assign_tiles``) and for the cost
model's price of a rank's decode."""

from __future__ import annotations

from typing import Sequence


def balance_by_area(areas: Sequence[int], ranks: int) -> list[list[int]]:
    """Positions in ``areas`` per rank, balanced by area: largest first, each to the least-loaded rank (ties: the
    lower position, then the lowest rank). Every rank's list is sorted; ranks may get none."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(areas)), key=lambda i: (-areas[i], i)):
        r = min(range(ranks), key=lambda k: (load[k], k))
        load[r] += areas[i]
        out[r].append(i)
    return [sorted(ids) for ids in out]


__all__ = ["balance_by_area"]
