"""What the heaviest window group holds and reads in each layer grid: tokens, windows, halo, proxy keys.

Ownership comes from :func:`atlasvid_dist.parallel.sharding.shard_windows` (the one sharding); here it is only
counted, vectorised over all groups at once, so the plan can price many rank counts quickly. The counts follow
``parallel/halo.py``: a group computes its own query tokens in every window of the layer grid that holds one of
them, and receives the keys/values of the other tokens in those windows (the halo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry.grid import Grid
from ..geometry.windows import WindowSpec, proxy_regions, window_layout
from ..parallel.sharding import WindowSharding, shard_windows

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class GroupShare:
    """Maxima over window groups for one layer grid (each maximum may come from a different group)."""

    tokens: int
    """Real tokens a group owns."""
    touched_windows: int
    """Windows of this layer grid holding at least one own token."""
    halo_tokens: int
    """Tokens of other groups inside those windows (keys/values received)."""
    halo_remote_tokens: int
    """Of those, tokens of groups on other nodes (received over InfiniBand, not NVLink)."""
    proxy_tokens: int
    """Distinct proxy tokens those windows read (what the group's proxy K/V cache must hold for this grid)."""


def shard(base: WindowSpec, groups: int, order: str = "thw") -> WindowSharding:
    return shard_windows(base, groups, order)


def owner_of_tokens(sharding: WindowSharding) -> torch.Tensor:
    """(N,) group of every raster token: the owner of its base window (vectorised ``WindowSharding.owner``)."""
    lay = window_layout(sharding.spec)
    window_of = torch.div(lay.inverse, lay.window_tokens, rounding_mode="floor")  # (N,) base window of each token
    return sharding.window_owner[window_of]


def group_share(
    sharding: WindowSharding,
    spec: WindowSpec,
    proxy: Grid | None,
    scales: tuple[float, float, float],
    margin: Triple,
    aligned: bool,
    node: torch.Tensor | None = None,
) -> GroupShare:
    """Count, for every group at once, what one layer grid ``spec`` asks of it; return the maxima.

    ``node``: (groups,) node of every group (None: all on one node)."""
    g = sharding.world_size
    lay = window_layout(spec)
    nw, wt = lay.num_windows, lay.window_tokens
    owner = torch.cat([owner_of_tokens(sharding), torch.tensor([-1])])  # (N + 1,) -1 at the padding sentinel
    slot_owner = owner[lay.order.view(nw, wt)]  # (nw, wt) group of every slot, -1 at padding
    code = torch.arange(nw)[:, None] * (g + 1) + (slot_owner + 1)  # (nw, wt)
    counts = torch.bincount(code.reshape(-1), minlength=nw * (g + 1)).view(nw, g + 1)[:, 1:]  # (nw, g) own slots
    touched = counts > 0  # (nw, g)
    real = lay.valid.sum(1, keepdim=True)  # (nw, 1) real tokens per window
    halo = (touched * (real - counts)).sum(0)  # (g,)
    node = torch.zeros(g, dtype=torch.long) if node is None else node
    pair = touched.long().T @ counts  # (g, g): tokens of group b inside the windows group a touches
    remote = (pair * (node[:, None] != node[None, :])).sum(1)  # (g,)
    if proxy is None:
        ctx = torch.zeros(g, dtype=torch.long)
    elif not aligned:
        ctx = torch.full((g,), proxy.size, dtype=torch.long)
    else:
        index, _ = proxy_regions(spec, proxy, scales, margin)  # (nw, C)
        pairs = touched.nonzero()  # (P, 2): (window, group)
        read = torch.zeros(g, proxy.size, dtype=torch.bool)  # (g, Np)
        read[pairs[:, 1:2].expand(-1, index.shape[1]), index[pairs[:, 0]]] = True
        ctx = read.sum(1)
    return GroupShare(
        tokens=int(counts.sum(0).max()),
        touched_windows=int(touched.sum(0).max()),
        halo_tokens=int(halo.max()),
        halo_remote_tokens=int(remote.max()),
        proxy_tokens=int(ctx.max()),
    )
