"""Moving residual rows between two holdings of the token grid: the shifted layers without a halo.

A shifted layer's windows straddle the blocks the ranks own. The halo exchange (``halo.py``) lets every owner of
a straddling window fetch the keys and values of the window's other tokens, so each straddling window's K/V
cross the cut in both directions, every shifted layer. Moving rows instead gives each window of the shifted grid
whole to one rank (:func:`~atlasvid_dist.parallel.sharding.assign_windows`: the one holding most of it) and moves
the residual rows (B, ·, D) of its other tokens there before the block; the whole block (attention, cross
attention, FFN) then runs on whole windows without communication, and the rows go back before the next layer
on the base grid. One row of D values crosses instead of a key and a value (2 x D), and in one direction only.

:func:`move_plan` is one rank's part of such a move between two holdings (a ``WindowSharding`` or a
``WindowAssignment``); :func:`move_rows` runs it. Bytes are counted under ``halo.rows`` (with the halo, so
``CommStats.total("halo")`` is the traffic a shifted layer costs either way). Inference only (no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .comm import CommStats
from .halo import exchange_rows


@dataclass(frozen=True)
class MovePlan:
    """One rank's rows to send and receive, and where every row of the new local order comes from."""

    rank: int
    num_src: int
    """Rows this rank holds before the move (its local order in the source holding)."""
    send: tuple[tuple[int, torch.Tensor], ...]
    """(peer, positions in the source local order), peers ascending, rows in the order the peer places them."""
    recv: tuple[tuple[int, int], ...]
    """(peer, rows received from it), peers ascending."""
    index: torch.Tensor
    """(N_dst,) position of every row of the destination local order in cat(source rows, received rows...)."""

    @property
    def num_sent(self) -> int:
        return sum(int(i.numel()) for _, i in self.send)

    def to(self, device) -> "MovePlan":
        send = tuple((p, i.to(device)) for p, i in self.send)
        return MovePlan(self.rank, self.num_src, send, self.recv, self.index.to(device))


def move_plan(src, dst, rank: int) -> MovePlan:
    """Rank ``rank``'s part of moving rows from holding ``src`` to holding ``dst`` (same token grid).

    A peer sends its rows in ascending destination-local position, which is the order the receiver needs them in.
    """
    mine = src.token_index(rank)  # (n_src,) raster ids in source local order
    goes_to = dst.owner[mine]
    order = torch.argsort(dst.local_position[mine])  # positions in source order, by destination position
    send = []
    for peer in range(src.world_size):
        if peer != rank:
            pos = order[goes_to[order] == peer]
            if pos.numel():
                send.append((peer, pos))
    wanted = dst.token_index(rank)  # (n_dst,) raster ids in destination local order
    comes_from = src.owner[wanted]
    index = torch.empty(wanted.numel(), dtype=torch.long)
    kept = comes_from == rank
    index[kept] = src.local_position[wanted[kept]]
    recv, offset = [], mine.numel()
    for peer in range(src.world_size):
        if peer == rank:
            continue
        arriving = (comes_from == peer).nonzero()[:, 0]  # destination positions, ascending
        if arriving.numel():
            recv.append((peer, int(arriving.numel())))
            index[arriving] = offset + torch.arange(arriving.numel())
            offset += arriving.numel()
    return MovePlan(rank, int(mine.numel()), tuple(send), tuple(recv), index)


def move_rows(
    x: torch.Tensor,
    plan: MovePlan,
    group=None,
    stats: CommStats | None = None,
    *,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """(B, N_src, ...) rows in the source local order -> (B, N_dst, ...) in the destination local order."""
    if x.shape[1] != plan.num_src:
        raise InputError(f"move_rows: x has {x.shape[1]} rows on dim 1; rank {plan.rank} holds {plan.num_src}")
    if not plan.send and not plan.recv:
        return x.index_select(1, plan.index)
    sends = [(p, x.index_select(1, idx)) for p, idx in plan.send]  # (B, n_p, ...)
    bufs = exchange_rows(sends, list(plan.recv), x, group, stats, "halo.rows", step, timeout)
    return torch.cat([x, *bufs], dim=1).index_select(1, plan.index)
