"""Halo exchange for layers whose window grid differs from the base sharding (shifted or resized windows).

Each rank computes attention for its OWN query tokens only (see ``sharding.py`` for ownership and local order).
A window of the layer's grid that contains some of its tokens may also contain tokens of other ranks: their keys
and values (the halo) are received from their owners before attention. :class:`HaloPlan` is that exchange as
index arithmetic for one rank (built by :func:`halo_plan`, testable without processes):

* ``send``: for every peer, the local positions of this rank's tokens that the peer needs;
* ``recv``: for every peer, how many tokens arrive; the halo buffer is their concatenation in peer order, each
  peer's tokens in raster order (the sender sends them in that order);
* ``windows``: the layer's windows touching this rank (global ids), with index tensors that lay out per window
  the query rows (own tokens only, compacted to ``Lq`` rows, padding flagged) and the key/value rows (own + halo
  tokens in the window's slot order, ``window_tokens`` rows, padding flagged). In a shifted grid most touched
  windows are only partly owned and the grid's edge windows are cut: the attention groups windows of equal
  counts and runs them without padding (``models.attention.kernels.group_windows``);
* ``output_index``: where every local token's output row sits in the (windows x Lq) query layout.

:func:`halo_exchange` moves the halo rows with autograd (the backward sends the gradients of the halo rows back
to their owners, which add them to their own). A layer with the base grid touches only own windows: its plan
has no peers and the exchange sends 0 bytes without touching the process group.

Tensors carry tokens on dim 1: (B, N, ...), e.g. (B, N, H, D) as in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, InputError
from ..geometry.windows import WindowSpec, window_layout
from .comm import CommStats, exchange
from .sharding import WindowSharding


@dataclass(frozen=True)
class HaloPlan:
    """One rank's halo traffic and local window layout for one layer grid (build with :func:`halo_plan`)."""

    rank: int
    """Group rank this plan belongs to."""
    spec: WindowSpec
    """The layer's window grid."""
    num_local: int
    """Tokens this rank owns (N_local)."""
    send: tuple[tuple[int, torch.Tensor], ...]
    """(peer, local positions sent to it, in the peer's receive order), peers ascending."""
    recv: tuple[tuple[int, int], ...]
    """(peer, tokens received from it), peers ascending; the halo buffer concatenates them in this order."""
    windows: torch.Tensor
    """(W,) ids of the layer's windows (as in ``window_layout(spec)``) holding an own token, ascending."""
    query_index: torch.Tensor
    """(W, Lq) local positions of the own tokens of each window; ``num_local`` at padding rows."""
    query_valid: torch.Tensor
    """(W, Lq) bool, False at padding rows."""
    key_index: torch.Tensor
    """(W, window_tokens) positions in cat(local, halo); ``num_local + num_halo`` at padding slots."""
    key_valid: torch.Tensor
    """(W, window_tokens) bool, False at padding slots."""
    output_index: torch.Tensor
    """(num_local,) flat position (window * Lq + row) of every local token's query row."""

    @property
    def num_halo(self) -> int:
        return sum(n for _, n in self.recv)

    @property
    def num_sent(self) -> int:
        """Token rows this rank sends in the forward exchange."""
        return sum(int(idx.numel()) for _, idx in self.send)

    @property
    def peers(self) -> list[int]:
        return sorted({p for p, _ in self.send} | {p for p, _ in self.recv})

    def to(self, device: torch.device | str) -> "HaloPlan":
        """The same plan with its index tensors on ``device``."""
        mv = lambda t: t.to(device)  # noqa: E731
        return HaloPlan(
            self.rank,
            self.spec,
            self.num_local,
            tuple((p, mv(i)) for p, i in self.send),
            self.recv,
            mv(self.windows),
            mv(self.query_index),
            mv(self.query_valid),
            mv(self.key_index),
            mv(self.key_valid),
            mv(self.output_index),
        )


# -- the plan --------------------------------------------------------------------------------------------------
def _halo_tokens(sharding: WindowSharding, spec: WindowSpec, rank: int):
    """Windows of ``spec`` touching ``rank``, their slots, and the foreign tokens in them sorted by (owner, raster)."""
    lay = window_layout(spec)
    n, wt = spec.grid.size, spec.window_tokens
    window_of = torch.div(lay.inverse, wt, rounding_mode="floor")  # (N,) layer window of every raster token
    windows = torch.unique(window_of[sharding.token_index(rank)])  # (W,) sorted
    slots = lay.order.view(-1, wt)[windows]  # (W, wt) raster index, n at padding
    valid = lay.valid[windows]
    owner = torch.cat([sharding.owner, torch.tensor([-1])])[slots]  # (W, wt); -1 at padding
    foreign = slots[valid & (owner != rank)]
    foreign = foreign[torch.argsort(sharding.owner[foreign] * n + foreign)]
    return windows, slots, valid, owner, foreign


def halo_plan(sharding: WindowSharding, spec: WindowSpec, rank: int) -> HaloPlan:
    """Plan the halo of ``rank`` for a layer grid ``spec`` over the sharding's token grid."""
    if spec.grid != sharding.spec.grid:
        raise ConfigError("spec.grid", spec.grid.dims, f"must be the sharded token grid {sharding.spec.grid.dims}")
    n_local, local_pos = sharding.num_tokens(rank), sharding.local_position
    windows, slots, valid, owner, foreign = _halo_tokens(sharding, spec, rank)
    own = valid & (owner == rank)  # (W, wt)
    # 1. what arrives: foreign tokens, grouped by owner (ascending), raster order inside a group
    counts = torch.bincount(sharding.owner[foreign], minlength=sharding.world_size)
    recv = tuple((p, int(c)) for p, c in enumerate(counts.tolist()) if c and p != rank)
    halo_pos = torch.full((sharding.spec.grid.size + 1,), -1, dtype=torch.long)
    halo_pos[foreign] = torch.arange(foreign.numel())
    # 2. what leaves: for every other rank, the tokens of ours in its windows, in its receive order
    send = []
    for peer in range(sharding.world_size):
        if peer != rank:
            theirs = _halo_tokens(sharding, spec, peer)[4]
            mine = theirs[sharding.owner[theirs] == rank]
            if mine.numel():
                send.append((peer, local_pos[mine]))
    # 3. key rows: own tokens by local position, halo tokens after them, one padding row last
    pad_row = n_local + foreign.numel()
    safe = slots.clamp(max=sharding.spec.grid.size - 1)
    key_index = torch.where(own, local_pos[safe], n_local + halo_pos[slots])
    key_index = torch.where(valid, key_index, torch.full_like(key_index, pad_row))
    # 4. query rows: the own tokens of every window, compacted to the front
    row = own.long().cumsum(1) - 1  # (W, wt) row of an own token inside its window's query block
    lq = int(own.sum(1).max()) if windows.numel() else 0
    query_index = torch.full((windows.numel(), lq), n_local, dtype=torch.long)
    query_valid = torch.zeros(windows.numel(), lq, dtype=torch.bool)
    w_idx = torch.arange(windows.numel())[:, None].expand_as(own)
    query_index[w_idx[own], row[own]] = local_pos[slots[own]]
    query_valid[w_idx[own], row[own]] = True
    output_index = torch.empty(n_local, dtype=torch.long)
    output_index[local_pos[slots[own]]] = w_idx[own] * lq + row[own]
    return HaloPlan(
        rank,
        spec,
        n_local,
        tuple(send),
        recv,
        windows,
        query_index,
        query_valid,
        key_index,
        valid.clone(),
        output_index,
    )


# -- the exchange -------------------------------------------------------------------------------------------------
def exchange_rows(
    rows_out: list[tuple[int, torch.Tensor]],
    shapes_in: list[tuple[int, int]],
    like: torch.Tensor,
    group,
    stats,
    category: str,
    step: str,
    timeout,
) -> list[torch.Tensor]:
    """Send every (peer, rows) and receive ``count`` rows from every (peer, count); tokens on dim 1."""
    bufs = [like.new_empty(like.shape[0], count, *like.shape[2:]) for _, count in shapes_in]
    exchange(
        rows_out,
        [(p, b) for (p, _), b in zip(shapes_in, bufs)],
        group,
        stats=stats,
        category=category,
        step=step,
        timeout=timeout,
    )
    return bufs


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, group, stats, step, timeout):
        ctx.plan, ctx.group, ctx.stats, ctx.step, ctx.timeout = plan, group, stats, step, timeout
        ctx.x_shape = x.shape
        sends = [(p, x.index_select(1, idx)) for p, idx in plan.send]  # (B, n_p, ...)
        bufs = exchange_rows(sends, list(plan.recv), x, group, stats, "halo.fwd", step, timeout)
        return torch.cat(bufs, dim=1) if bufs else x.new_empty(x.shape[0], 0, *x.shape[2:])

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        counts = [c for _, c in plan.recv]
        grads_back = list(zip([p for p, _ in plan.recv], grad.split(counts, dim=1))) if counts else []
        bufs = exchange_rows(
            grads_back,
            [(p, int(idx.numel())) for p, idx in plan.send],
            grad,
            ctx.group,
            ctx.stats,
            "halo.bwd",
            ctx.step,
            ctx.timeout,
        )
        dx = grad.new_zeros(ctx.x_shape)
        for (_, idx), g in zip(plan.send, bufs):
            dx.index_add_(1, idx, g)
        return dx, None, None, None, None, None


def halo_exchange(
    kv_local: torch.Tensor,
    plan: HaloPlan,
    group: dist.ProcessGroup | None = None,
    stats: CommStats | None = None,
    *,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """Receive the halo rows of ``plan`` from their owners and send ours: (B, N_local, ...) -> (B, N_halo, ...).

    Differentiable: the gradient of a halo row goes back to its owner and is added to the owner's row. Exchange
    keys and values together (concatenated on the last dim) to pay one message per peer. Bytes are counted under
    ``halo.fwd`` / ``halo.bwd``; a plan without peers (a layer on the base grid) sends nothing.
    """
    if kv_local.shape[1] != plan.num_local:
        raise InputError(
            f"halo_exchange: kv_local has {kv_local.shape[1]} tokens on dim 1 {tuple(kv_local.shape)}; "
            f"rank {plan.rank} owns {plan.num_local}"
        )
    return _HaloExchange.apply(kv_local, plan, group, stats, step, timeout)
