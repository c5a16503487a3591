"""Windows too large for one device: each window group of ``g`` ranks shares its windows with Ulysses.

With W workers and window_group g there are G = W / g groups. The base windows are sharded over the G groups
exactly as over G ranks (``shard_for``); group j's tokens (its local order) are cut into g equal contiguous
slices, one per member (the last may be shorter). Rank r is member s = r % g of group j = r // g. Per layer,
member s of group j

1. turns its token slice into a head slice with an all-to-all inside the group (Ulysses): it now holds every
   token of group j for heads [s * H/g, (s + 1) * H/g);
2. runs exactly what :class:`ShardedWindowAttention` does for group rank j on those heads — including the halo
   exchange of shifted layers, which goes to the *same slot* s of the neighbouring groups (one process group per
   slot), and the proxy keys/values of its heads only;
3. turns the head slice back into its token slice (second all-to-all).

So the per-rank activation memory of everything but attention is 1/g of a group's, attention works on H/g heads
of whole windows, and the result is the single-process one. ``window_parallel='ring'`` (keys/values passed
round the group) is not implemented: the plan refuses it with a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config.method import AtlasConfig
from ..errors import ConfigError, PlanError
from ..geometry.grid import Grid
from ..models.rope import Rotary3D
from .comm import CommStats
from .sharding import WindowSharding
from .ulysses import heads_to_seq, seq_to_heads
from .window_attention import ShardedWindowAttention


@dataclass(frozen=True)
class GroupLayout:
    """Where one rank sits: its window group, its slot in it, and the slice of the group's tokens it holds."""

    group: int
    """Window group j (a rank of the group-level WindowSharding)."""
    slot: int
    """Member s inside the group."""
    size: int
    """Ranks per group (g)."""
    slice_len: int
    """L = ceil(n_j / g): tokens of every member's slice (the last member's may be shorter)."""
    start: int
    """First row of this member's slice in the group's local order."""
    count: int
    """Rows this member holds (>= 1)."""


def group_layout(sharding: WindowSharding, rank: int, window_group: int) -> GroupLayout:
    """The layout of ``rank`` when ``sharding`` (over the groups) is split ``window_group`` ways inside each group."""
    g = window_group
    j, s = divmod(rank, g)
    n = sharding.num_tokens(j)
    length = -(-n // g)
    count = min(length, n - s * length)
    if n - (g - 1) * length < 1:
        raise PlanError(
            f"window group {j} has {n} tokens: too few to give each of its {g} ranks a slice of "
            f"{length}; use a smaller window_group or larger windows"
        )
    return GroupLayout(j, s, g, length, s * length, count)


def new_groups(world: int, window_group: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this rank's window group, this rank's slot group). Every rank must call it (new_group is collective)."""
    g, rank = window_group, dist.get_rank()
    groups, slots = {}, {}
    for j in range(world // g):
        groups[j] = dist.new_group([j * g + s for s in range(g)])
    for s in range(g):
        slots[s] = dist.new_group([j * g + s for j in range(world // g)])
    return groups[rank // g], slots[rank % g]


@dataclass(frozen=True)
class _HeadSlice:
    """ProxyKV-like view of a cache restricted to a range of heads."""

    keys: list
    values: list
    grid: Grid
    rows: list
    """As ``ProxyKV.rows``: per layer the kept raster ids (None: all)."""


class GroupedWindowAttention:
    """``attend(layer, q, k, v)`` for a rank's token slice of its window group (see the module docstring)."""

    def __init__(
        self,
        config: AtlasConfig,
        grid: Grid,
        rotary: Rotary3D,
        sharding: WindowSharding,
        layout: GroupLayout,
        num_heads: int,
        device,
        proxy=None,
        scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
        num_layers: int | None = None,
        group: dist.ProcessGroup | None = None,
        slot_group: dist.ProcessGroup | None = None,
        stats: CommStats | None = None,
        timeout: float | None = None,
        window_parallel: str = "ulysses",
    ):
        if window_parallel != "ulysses":
            raise ConfigError(
                "window_parallel",
                window_parallel,
                "only 'ulysses' splits a window over a group (ring inside windows is not implemented)",
            )
        if num_heads % layout.size:
            raise PlanError(
                f"window_group = {layout.size} does not divide the model's {num_heads} heads "
                f"(Ulysses gives each rank heads / window_group of them)"
            )
        hp = num_heads // layout.size
        heads = slice(layout.slot * hp, (layout.slot + 1) * hp)
        if proxy is not None:
            rows = list(getattr(proxy, "rows", None) or [None] * len(proxy.keys))
            proxy = _HeadSlice(
                [k[:, :, heads] for k in proxy.keys], [v[:, :, heads] for v in proxy.values], proxy.grid, rows
            )
        self.layout, self.group, self.timeout = layout, group, timeout
        self.stats = stats if stats is not None else CommStats()
        self.inner = ShardedWindowAttention(
            config,
            grid,
            rotary,
            sharding,
            layout.group,
            device,
            proxy,
            scales,
            num_layers,
            slot_group,
            self.stats,
            timeout,
        )
        self.group_tokens = sharding.num_tokens(layout.group)
        self.layer_bytes: dict[int, int] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, count, H, D) un-rotated, this member's slice -> attention output (B, count, H, D)."""
        lay, before = self.layout, self.stats.total()
        step = f"layer {layer} (window group)"
        qkv = torch.stack([self._pad(t) for t in (q, k, v.to(q.dtype))])  # (3, B, L, H, D)
        qkv = seq_to_heads(qkv.transpose(2, 3), self.group, self.stats, step, self.timeout)  # (3, B, H/g, g*L, D)
        qh, kh, vh = qkv[..., : self.group_tokens, :].transpose(2, 3).unbind(0)  # (B, n_j, H/g, D) each
        out = self.inner(layer, qh.contiguous(), kh.contiguous(), vh.contiguous())  # (B, n_j, H/g, D)
        pad = lay.size * lay.slice_len - self.group_tokens
        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad)).transpose(1, 2)  # (B, H/g, g*L, D)
        out = heads_to_seq(out.contiguous(), self.group, self.stats, step, self.timeout)  # (B, H, L, D)
        self.layer_bytes[layer] = self.layer_bytes.get(layer, 0) + self.stats.total() - before
        return out.transpose(1, 2)[:, : lay.count]  # (B, count, H, D)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, count, H, D) -> (B, L, H, D), zero rows after the slice (only the last member has any)."""
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.layout.slice_len - x.shape[1]))
