"""Window-to-rank sharding of the detail branch: each rank owns a contiguous block of base windows.

The base grid is the layer grid without a shift (``geometry.WindowSpec``). Its windows, in the *ownership order*
(``order``: the window axes slowest first; 'thw', the default, is window-major: t, then h, then w), are cut into
``world_size`` contiguous blocks with about the same number of *real* tokens (padding slots of partial windows do
not count). A block of consecutive windows in that order is a compact slab of the video: with 'thw' whole rows of
windows, then whole time slices (a time slab); with 'wht' whole columns of windows across all time (a column
slab). An unshifted layer needs no communication and a shifted layer exchanges only a halo with the ranks next
to it (``halo.py``); which order is cheaper depends on the axes the shifted grid moves along (``cost.ranks``).

Each rank keeps its tokens in *local order*: its real tokens window by window in the ownership order (inside a
window, the window's own slot order). Pure index
arithmetic on CPU tensors; no process group is needed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import PlanError, check
from ..geometry.windows import WindowSpec, window_layout

#: Ownership orders (window axes, slowest first): time slabs, column slabs, row slabs, ...
WINDOW_ORDERS = ("thw", "wht", "hwt", "twh", "htw", "wth")

#: How a layer on another window grid than the base one (a shifted layer) gets the tokens of its windows: 'kv'
#: (each rank fetches the keys/values of the other tokens in the windows it touches: the halo, ``halo.py``) or
#: 'rows' (every window is given whole to one rank, and the residual rows of its other tokens move there for the
#: block and back after it: ``migrate.py``).
SHIFT_EXCHANGES = ("kv", "rows")


def ownership_sequence(spec: WindowSpec, order: str = "thw") -> torch.Tensor:
    """(num_windows,) window ids (window-major, as ``window_layout``) in the ownership ``order``."""
    check(
        order in WINDOW_ORDERS,
        "window_order",
        order,
        f"must be one of {WINDOW_ORDERS} (window axes, slowest "
        "first: 'thw' = time slabs, 'wht' = column slabs across all time)",
    )
    ct, ch, cw = spec.counts
    ids = torch.arange(ct * ch * cw).view(ct, ch, cw)
    return ids.permute(*["thw".index(a) for a in order]).reshape(-1)


class _Holdings:
    """Token bookkeeping shared by every way of giving windows to ranks: a rank holds the real tokens of its
    windows (``windows(rank)``), window by window, each window in its slot order (its *local order*)."""

    spec: WindowSpec
    world_size: int
    window_owner: torch.Tensor
    """(num_windows,) rank of every window of ``spec`` (window-major numbering)."""

    def windows(self, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def token_index(self, rank: int) -> torch.Tensor:
        """(N_rank,) raster indices of the real tokens ``rank`` holds, in its local order."""
        return self._tokens[rank]

    def num_tokens(self, rank: int) -> int:
        return int(self._tokens[rank].numel())

    @property
    def tokens_per_rank(self) -> list[int]:
        return [int(t.numel()) for t in self._tokens]

    @cached_property
    def owner(self) -> torch.Tensor:
        """(grid.size,) rank that holds every raster token: the rank of its window (vectorised, so the cost
        model can count grids of millions of tokens with it)."""
        lay = window_layout(self.spec)
        window_of = torch.div(lay.inverse, lay.window_tokens, rounding_mode="floor")  # (N,) window of each token
        return self.window_owner[window_of]

    @cached_property
    def local_position(self) -> torch.Tensor:
        """(grid.size,) position of every raster token in its holder's local order."""
        out = torch.empty(self.spec.grid.size, dtype=torch.long)
        for idx in self._tokens:
            out[idx] = torch.arange(idx.numel())
        return out

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank ``rank``'s tokens of ``x`` (raster order along ``dim``), in local order."""
        return x.index_select(dim, self.token_index(rank).to(x.device))

    def unshard(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`shard`: every rank's local part (rank order) back in raster order along ``dim``."""
        check(len(parts) == self.world_size, "parts", len(parts), f"must hold one tensor per rank ({self.world_size})")
        order = torch.cat(self._tokens).to(parts[0].device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(parts, dim).index_select(dim, inverse)

    @cached_property
    def _tokens(self) -> list[torch.Tensor]:
        lay = window_layout(self.spec)
        slots = lay.order.view(lay.num_windows, lay.window_tokens)  # (num_windows, window_tokens)
        out = []
        for r in range(self.world_size):
            ids = self.windows(r)
            block, valid = slots[ids].reshape(-1), lay.valid[ids].reshape(-1)
            out.append(block[valid])
        return out

    def _check_rank(self, rank: int) -> None:
        check(0 <= rank < self.world_size, "rank", rank, f"must be in [0, world_size = {self.world_size})")


@dataclass(frozen=True)
class WindowSharding(_Holdings):
    """Which base windows, and so which tokens, every rank owns; build with :func:`shard_windows`."""

    spec: WindowSpec
    """Base (unshifted) window grid of the detail branch."""
    world_size: int
    """Ranks sharing the windows."""
    bounds: tuple[int, ...]
    """world_size + 1 positions: rank r owns windows sequence[bounds[r]:bounds[r + 1]] of the ownership order."""
    order: str = "thw"
    """Ownership order: window axes, slowest first ('thw' = time slabs, 'wht' = column slabs across all time)."""

    def __post_init__(self) -> None:
        b = self.bounds
        check(
            len(b) == self.world_size + 1
            and b[0] == 0
            and b[-1] == self.spec.num_windows
            and all(x < y for x, y in zip(b[:-1], b[1:])),
            "bounds",
            b,
            f"must rise strictly from 0 to num_windows = {self.spec.num_windows} in world_size + 1 = "
            f"{self.world_size + 1} steps (use shard_windows)",
        )

    @cached_property
    def sequence(self) -> torch.Tensor:
        """(num_windows,) base window ids in the ownership order."""
        return ownership_sequence(self.spec, self.order)

    def window_range(self, rank: int) -> range:
        """Positions in :attr:`sequence` of the base windows ``rank`` owns (the window ids themselves with 'thw')."""
        self._check_rank(rank)
        return range(self.bounds[rank], self.bounds[rank + 1])

    def windows(self, rank: int) -> torch.Tensor:
        """Base window ids (window-major numbering) ``rank`` owns, in its local order."""
        r = self.window_range(rank)
        return self.sequence[r.start : r.stop]

    @cached_property
    def window_owner(self) -> torch.Tensor:
        """(num_windows,) rank owning every base window (window-major numbering)."""
        out = torch.empty(self.spec.num_windows, dtype=torch.long)
        for r, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            out[self.sequence[lo:hi]] = r
        return out


@dataclass(frozen=True, eq=False)
class WindowAssignment(_Holdings):
    """Every window of another layer grid (a shifted one) given whole to one rank: where the residual rows of a
    layer live when ranks move rows instead of fetching keys/values (``parallel.migrate``). Build with
    :func:`assign_windows`."""

    spec: WindowSpec
    """The layer's window grid."""
    world_size: int
    window_owner: torch.Tensor
    """(num_windows,) rank of every window of ``spec`` (window-major numbering)."""

    def windows(self, rank: int) -> torch.Tensor:
        """Window ids of ``spec`` that ``rank`` holds, ascending (its local order)."""
        self._check_rank(rank)
        return (self.window_owner == rank).nonzero()[:, 0]


def window_counts(token_owner: torch.Tensor, spec: WindowSpec, world_size: int) -> torch.Tensor:
    """(num_windows, world_size) real tokens of every window of ``spec`` that each rank holds, given the rank of
    every raster token (``token_owner``, (grid.size,)); vectorised for grids of millions of tokens."""
    lay = window_layout(spec)
    nw, wt = lay.num_windows, lay.window_tokens
    owner = torch.cat([token_owner, torch.tensor([-1])])  # (N + 1,) -1 at the padding sentinel
    slot_owner = owner[lay.order.view(nw, wt)]  # (nw, wt) rank of every slot, -1 at padding
    code = torch.arange(nw)[:, None] * (world_size + 1) + (slot_owner + 1)  # (nw, wt)
    counts = torch.bincount(code.reshape(-1), minlength=nw * (world_size + 1))
    return counts.view(nw, world_size + 1)[:, 1:]


def assign_windows(token_owner: torch.Tensor, spec: WindowSpec, world_size: int) -> WindowAssignment:
    """Give every window of ``spec`` to a rank holding most of its real tokens, so that the fewest rows move;
    ``token_owner`` is (grid.size,) the rank of every raster token in the layout they come from
    (``WindowSharding.owner``).

    A window two or more ranks hold equal largest shares of (a cut through its middle) moves as many rows
    whichever of them takes it, so these go, in window order, to the tied rank holding the fewest tokens so far:
    otherwise the first rank would collect the ties and do more work than the others in every shifted layer."""
    counts = window_counts(token_owner, spec, world_size)  # (nw, g)
    g = world_size
    owner = (counts * g + (g - 1 - torch.arange(g))).argmax(1)  # most tokens, then the lowest rank
    tied = counts == counts.max(1, keepdim=True).values  # (nw, g)
    ties = tied.sum(1) > 1
    size = counts.sum(1)
    load = torch.bincount(owner[~ties], weights=size[~ties].double(), minlength=g).tolist()
    for w, cands, n in zip(ties.nonzero()[:, 0].tolist(), tied[ties].tolist(), size[ties].tolist()):
        r = min((r for r in range(g) if cands[r]), key=lambda r: (load[r], r))
        owner[w] = r
        load[r] += n
    return WindowAssignment(spec, world_size, owner)


def shard_windows(spec: WindowSpec, world_size: int, order: str = "thw") -> WindowSharding:
    """Cut the windows of ``spec`` (in the ownership ``order``) into ``world_size`` contiguous blocks balanced by
    real tokens.

    Block r ends at the window boundary whose running token count is nearest r/world_size of all tokens (every
    block keeps at least one window). Fewer windows than ranks is a PlanError.
    """
    check(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "must be a positive integer")
    n = spec.num_windows
    if n < world_size:
        raise PlanError(
            f"window sharding: {n} windows (grid {spec.grid.dims}, window {spec.window}, counts "
            f"{spec.counts}) cannot be shared by {world_size} ranks: every rank needs at least one "
            f"window; use fewer ranks, smaller windows, or split a window with Ulysses/ring"
        )
    weights = window_layout(spec).valid.sum(1)[ownership_sequence(spec, order)]  # real tokens per window, in order
    cum = torch.cat([weights.new_zeros(1), weights.cumsum(0)]).tolist()  # tokens before window i
    total, bounds = cum[-1], [0]
    for r in range(1, world_size):
        lo, hi = bounds[-1] + 1, n - (world_size - r)  # keep >= 1 window for this block and every later one
        target = total * r / world_size
        i = bisect.bisect_left(cum, target)  # cum[i - 1] < target <= cum[i]
        best = i if i <= n and (i == 0 or cum[i] - target <= target - cum[i - 1]) else i - 1
        bounds.append(min(max(best, lo), hi))
    bounds.append(n)
    return WindowSharding(spec, world_size, tuple(bounds), order)
