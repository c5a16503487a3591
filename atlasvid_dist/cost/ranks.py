"""What the heaviest window group holds and reads in each layer grid: tokens, windows, halo, proxy keys, moved rows.

Ownership comes from :func:`atlasvid_dist.parallel.sharding.shard_windows` (the one sharding) and, for shifted
layers that move rows, :func:`~atlasvid_dist.parallel.sharding.assign_windows` (the one assignment); here they
are only counted, vectorised over all groups at once, so the plan can price many rank counts quickly. The counts
follow ``parallel/halo.py``: a group computes its own query tokens in every window of the layer grid that holds
one of them, and receives the keys/values of the other tokens in those windows (the halo); and
``parallel/migrate.py``: between two layers on different holdings every row whose holder changes is sent once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry.grid import Grid
from ..geometry.windows import WindowSpec, proxy_regions, window_layout
from ..parallel.sharding import WindowSharding, assign_windows, shard_windows, window_counts

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
    key_pairs: int
    """Query-key pairs of the group's attention inside those windows: its own tokens of each window times the
    window's real tokens, summed (the kernel runs each window at its real lengths, no padding slot)."""


def shard(base: WindowSpec, groups: int, order: str = "thw") -> WindowSharding:
    return shard_windows(base, groups, order)


def owner_of_tokens(sharding: WindowSharding) -> torch.Tensor:
    """(N,) group of every raster token: the owner of its base window (``WindowSharding.owner``)."""
    return sharding.owner


def assigned_owner(token_owner: torch.Tensor, spec: WindowSpec, groups: int) -> torch.Tensor:
    """(N,) group of every raster token when every window of ``spec`` is given whole to the group holding most
    of it (``assign_windows(...).owner``)."""
    return assign_windows(token_owner, spec, groups).owner


@dataclass(frozen=True)
class Moves:
    """Rows a group sends and receives in one forward when shifted layers move rows (maxima over groups)."""

    sent: int
    """Rows the heaviest sender sends over the whole forward."""
    sent_remote: int
    """Of the rows that group sends, those going to another node (the heaviest such group)."""
    received_once: int
    """Most rows one group receives in one move (the receive buffers it holds at once)."""


def moved_rows(owners: list[torch.Tensor], groups: int, node: torch.Tensor | None = None) -> Moves:
    """Count the moves along a forward whose layers hold their rows by ``owners`` in turn ((N,) group of every
    raster token, layer by layer, the given layout first and last): between two consecutive holdings every row
    whose group changes is sent once by its old group to its new one."""
    node = torch.zeros(groups, dtype=torch.long) if node is None else node
    sent, remote = torch.zeros(groups, dtype=torch.long), torch.zeros(groups, dtype=torch.long)
    received = 0
    moves: dict[tuple[int, int], list] = {}  # the same two holdings recur every other layer: count each move once
    for a, b in zip(owners[:-1], owners[1:]):
        if a is not b:
            moves.setdefault((id(a), id(b)), [a, b, 0])[2] += 1
    for a, b, times in moves.values():
        change = a != b
        sent += times * torch.bincount(a[change], minlength=groups)
        far = change & (node[a] != node[b])
        remote += times * torch.bincount(a[far], minlength=groups)
        received = max(received, int(torch.bincount(b[change], minlength=groups).max()))
    return Moves(int(sent.max()), int(remote.max()), received)


def group_share(
    token_owner: torch.Tensor,
    groups: int,
    spec: WindowSpec,
    proxy: Grid | None,
    scales: tuple[float, float, float],
    margin: Triple,
    aligned: bool,
    node: torch.Tensor | None = None,
) -> GroupShare:
    """Count, for every group at once, what one layer grid ``spec`` asks of it when ``token_owner`` ((N,) group
    of every raster token) says where the rows live; return the maxima. Windows held whole by one group (rows
    moved there) have no halo.

    ``node``: (groups,) node of every group (None: all on one node)."""
    g = groups
    lay = window_layout(spec)
    counts = window_counts(token_owner, spec, g)  # (nw, g) own slots
    touched = counts > 0  # (nw, g)
    real = lay.valid.sum(1, keepdim=True)  # (nw, 1) real tokens per window
    halo = (touched * (real - counts)).sum(0)  # (g,)
    key_pairs = (counts * real).sum(0)  # (g,)
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
        key_pairs=int(key_pairs.max()),
    )
