"""Window attention of the detail branch on one rank of a window sharding: an ``attend`` callback for run_blocks.

:class:`ShardedWindowAttention` is what :class:`~atlasvid_dist.models.attention.detail.DetailAttention` does for
the whole grid, restricted to the tokens one rank owns (``WindowSharding.token_index(rank)``, local order). It
is called by every block with that block's un-rotated q, k, v (B, N_local, H, D) and returns the attention
output of the rank's own queries (B, N_local, H, D), in local order. Per layer:

* the layer's window grid is the base grid (unshifted): every window the rank touches is its own, the halo plan
  has no peers, and nothing is sent;
* any other grid (shifted windows): the keys/values of foreign tokens in the rank's windows (the halo) arrive
  from their owners through :func:`~atlasvid_dist.parallel.halo.halo_exchange` (keys already rotated, keys and
  values in one message per peer), then the rank's own queries attend inside the layer's windows;
* with exchange 'rows' instead, a shifted layer's windows are each given whole to one rank
  (:func:`layer_holdings`); ``run_blocks`` calls :meth:`ShardedWindowAttention.move` to put the residual rows in
  that layer's holdings before the block and back after it (``migrate.py``), and the attention itself then sends
  nothing: every window it computes is complete;
* proxy keys/values (mode 'atlas'): the rank keeps, per layer, only the proxy rows its windows read (the aligned
  regions of its windows, or all rows for proxy_context 'all': :class:`ProxyRows`); they are copied once at
  construction, or were recorded with only those rows (``keep`` of ``AtlasTransformer.build_proxy_cache``).

The module is model-agnostic: it needs the geometry (AtlasConfig, grid, Rotary3D) and a ProxyKV-like object with
``keys[layer]`` / ``values[layer]`` (B, Np, H, D) and ``grid``. Bytes sent are counted in a CommStats (category
``halo.fwd``) and per layer in :attr:`ShardedWindowAttention.layer_bytes`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config.method import AtlasConfig
from ..errors import ConfigError
from ..geometry.grid import Grid
from ..geometry.windows import WindowSpec, proxy_regions
from ..models.attention.kernels import WindowRows, gathered_windows_sdpa, group_windows
from ..models.rope import Rotary3D, apply_rotary
from .comm import CommStats
from .halo import HaloPlan, halo_exchange, halo_plan
from .migrate import move_plan, move_rows
from .sharding import SHIFT_EXCHANGES, WindowSharding, assign_windows, shard_windows


def base_spec(config: AtlasConfig, grid: Grid) -> WindowSpec:
    """The unshifted window grid of the first schedule entry: the grid the windows are sharded by."""
    window, _ = config.layer_entries()[0]
    return WindowSpec(grid, window, (0, 0, 0), pad=config.pad_windows)


def layer_spec(config: AtlasConfig, grid: Grid, layer: int) -> WindowSpec:
    """The window grid of ``layer`` (same rule as DetailAttention.layer_spec)."""
    entries = config.layer_entries()
    window, shift = entries[layer % len(entries)]
    return WindowSpec(grid, window, shift, pad=config.pad_windows)


def shard_for(config: AtlasConfig, grid: Grid, world_size: int, order: str = "thw") -> WindowSharding:
    """The window sharding of ``grid`` over ``world_size`` ranks in the ownership ``order`` (PlanError if there are
    fewer windows than ranks)."""
    return shard_windows(base_spec(config, grid), world_size, order)


def layer_holdings(sharding: WindowSharding, spec: WindowSpec, exchange: str = "kv"):
    """Where the rows of a layer on window grid ``spec`` live: the sharding itself (its own grid, or 'kv'), or
    every window of ``spec`` given whole to the rank holding most of it ('rows')."""
    if exchange == "kv" or spec == sharding.spec:
        return sharding
    return assign_windows(sharding.owner, spec, sharding.world_size)


@dataclass(frozen=True)
class _Layer:
    """What one layer grid needs on this rank."""

    plan: HaloPlan
    proxy_rows: torch.Tensor | None
    """(U,) proxy token rows the rank's windows read (None: no proxy)."""
    proxy_index: torch.Tensor | None
    """(W, C) rows of the rank's windows into the kept proxy rows (positions in ``proxy_rows``)."""
    groups: tuple[WindowRows, ...]
    """The rank's windows grouped by (own queries, real keys): query rows are local rows, key rows index
    [local rows | halo rows | kept proxy rows]; no padding slot, so cut windows run at their real lengths."""


def _layer_rows(plan: HaloPlan, proxy_index: torch.Tensor | None) -> tuple[WindowRows, ...]:
    """The halo plan's windows as groups of rows into [local | halo | kept proxy] rows (gathered_windows_sdpa)."""
    extra = None
    if proxy_index is not None:
        extra = plan.num_local + plan.num_halo + proxy_index.to(plan.key_index.device)  # (W, C)
    return group_windows(plan.query_index, plan.query_valid, plan.key_index, plan.key_valid, extra)


class ProxyRows:
    """The proxy rows one rank's windows read, per layer: ``self(layer)`` is the (U,) raster ids the rank keeps
    of that layer's proxy keys/values (the aligned regions of its windows with their margin, or every row for
    proxy_context 'all'), ``index(layer)`` the (W, C) positions of each of its windows' context in them.

    Needs only the geometry, not the keys/values: a rank passes it as ``keep`` when the proxy is recorded
    (``AtlasTransformer.build_proxy_cache``), so each layer's rows are selected as it is computed.
    """

    def __init__(self, config: AtlasConfig, grid: Grid, proxy_grid: Grid, scales, windows):
        """``windows(spec)``: the (W,) ids of the windows of ``spec`` that hold the rank's tokens."""
        self.config, self.grid, self.proxy_grid, self.scales = config, grid, proxy_grid, scales
        self._windows = windows
        self._by_spec: dict[WindowSpec, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of_rank(
        cls,
        config: AtlasConfig,
        grid: Grid,
        sharding: WindowSharding,
        rank: int,
        proxy_grid: Grid,
        scales,
        exchange: str = "kv",
    ):
        """Rank ``rank``'s rows under ``sharding`` (its windows from the halo plan of each layer grid, on the
        holdings ``exchange`` gives that grid: :func:`layer_holdings`)."""

        def windows(spec):
            return halo_plan(layer_holdings(sharding, spec, exchange), spec, rank).windows

        return cls(config, grid, proxy_grid, scales, windows)

    def __call__(self, layer: int) -> torch.Tensor:
        return self._entry(layer)[0]

    def index(self, layer: int) -> torch.Tensor:
        return self._entry(layer)[1]

    def _entry(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = layer_spec(self.config, self.grid, layer)
        if spec not in self._by_spec:
            windows = self._windows(spec).cpu()
            if self.config.proxy_context == "aligned":
                full, _ = proxy_regions(spec, self.proxy_grid, self.scales, self.config.proxy_margin)
                rows, index = torch.unique(full[windows], return_inverse=True)  # full[windows]: (W, C) raster ids
            else:  # 'all': every window reads every proxy token
                rows = torch.arange(self.proxy_grid.size)
                index = rows[None].expand(windows.numel(), -1)
            self._by_spec[spec] = (rows, index)
        return self._by_spec[spec]


class ShardedWindowAttention:
    """``attend(layer, q, k, v)`` for one rank's tokens (see the module docstring)."""

    def __init__(
        self,
        config: AtlasConfig,
        grid: Grid,
        rotary: Rotary3D,
        sharding: WindowSharding,
        rank: int,
        device: torch.device | str,
        proxy=None,
        scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
        num_layers: int | None = None,
        group: dist.ProcessGroup | None = None,
        stats: CommStats | None = None,
        timeout: float | None = None,
        exchange: str = "kv",
    ):
        """``proxy``: a ProxyKV-like object, every row of each layer or (``rows[layer]`` set) exactly the rows
        :class:`ProxyRows` gives this rank. ``exchange``: one of :data:`SHIFT_EXCHANGES`; with 'rows' the
        forward passes :meth:`move` to ``run_blocks``."""
        if exchange not in SHIFT_EXCHANGES:
            raise ConfigError("shift_exchange", exchange, f"must be one of {SHIFT_EXCHANGES}")
        if config.mode != "atlas":
            raise ConfigError("method.mode", config.mode, "sharded window attention runs mode 'atlas' only")
        if sharding.spec != base_spec(config, grid):
            raise ConfigError("sharding.spec", sharding.spec, f"must be the base window grid {base_spec(config, grid)}")
        self.config, self.grid, self.sharding, self.rank = config, grid, sharding, rank
        self.device = torch.device(device)
        self.group, self.timeout = group, timeout
        self.stats = stats if stats is not None else CommStats()
        self.layer_bytes: dict[int, int] = {}
        self.exchange = exchange
        self.token_index = sharding.token_index(rank)  # (N_local,) raster ids, local order
        self.rotary = rotary
        self.tables = rotary.for_tokens(grid, self.token_index).to(self.device)
        self.scales = scales
        self._holdings: dict[WindowSpec, object] = {sharding.spec: sharding}
        self._tables: dict[WindowSpec, object] = {sharding.spec: self.tables}
        self._moves: dict[tuple, object] = {}
        self._plans: dict[WindowSpec, HaloPlan] = {}
        self._layers: dict[WindowSpec, _Layer] = {}
        self._rows = None if proxy is None else ProxyRows(config, grid, proxy.grid, scales, self._plan_windows)
        self._proxy_k: list[torch.Tensor] = []
        self._proxy_v: list[torch.Tensor] = []
        if proxy is not None:
            n = len(proxy.keys) if num_layers is None else num_layers
            for layer in range(n):
                k, v = _kept_rows(proxy, layer, self._rows(layer))
                self._proxy_k.append(k.to(self.device))  # (B, U, H, D)
                self._proxy_v.append(v.to(self.device))

    def reading(self, proxy) -> "ShardedWindowAttention":
        """The same rank's attention reading other proxy keys/values (proxy_mode 'joint': new ones every
        forward), sharing this one's geometry (RoPE tables, halo and move plans, proxy rows) instead of building
        it again; its byte counts start at zero."""
        other = copy.copy(self)
        other.layer_bytes = {}
        other._proxy_k, other._proxy_v = [], []
        for layer in range(len(self._proxy_k)):
            k, v = _kept_rows(proxy, layer, self._rows(layer))
            other._proxy_k.append(k.to(self.device))  # (B, U, H, D)
            other._proxy_v.append(v.to(self.device))
        return other

    @property
    def num_local(self) -> int:
        return int(self.token_index.numel())

    def proxy_bytes(self) -> int:
        """Bytes of proxy keys/values this rank keeps."""
        return sum(t.numel() * t.element_size() for t in self._proxy_k + self._proxy_v)

    # -- geometry -------------------------------------------------------------------------------------------------
    def _held(self, spec: WindowSpec):
        """The holdings the rows of a layer on ``spec`` live on (:func:`layer_holdings`), built once."""
        key = spec if self.exchange == "rows" else self.sharding.spec
        if key not in self._holdings:
            self._holdings[key] = layer_holdings(self.sharding, spec, self.exchange)
            self._tables[key] = self.rotary.for_tokens(self.grid, self._holdings[key].token_index(self.rank)).to(
                self.device
            )
        return key

    def _plan(self, spec: WindowSpec) -> HaloPlan:
        if spec not in self._plans:
            self._plans[spec] = halo_plan(self._holdings[self._held(spec)], spec, self.rank)
        return self._plans[spec]

    def _plan_windows(self, spec: WindowSpec) -> torch.Tensor:
        return self._plan(spec).windows

    def _layer(self, layer: int) -> _Layer:
        spec = layer_spec(self.config, self.grid, layer)
        if spec not in self._layers:
            rows = index = None
            if self._rows is not None:
                rows, index = self._rows(layer), self._rows.index(layer).to(self.device)
            plan = self._plan(spec).to(self.device)
            self._layers[spec] = _Layer(plan, rows, index, _layer_rows(plan, index))
        return self._layers[spec]

    # -- the callbacks --------------------------------------------------------------------------------------------
    def move(self, frm: int | None, to: int | None, x: torch.Tensor) -> torch.Tensor:
        """``run_blocks``' ``move``: rows x (B, n, D) laid out for layer ``frm`` -> for layer ``to`` (None: the
        base sharding). Nothing moves with exchange 'kv' or between layers on the same holdings."""
        a, b = (
            self.sharding.spec if i is None else self._held(layer_spec(self.config, self.grid, i)) for i in (frm, to)
        )
        if a == b:
            return x
        if (a, b) not in self._moves:
            self._moves[(a, b)] = move_plan(self._holdings[a], self._holdings[b], self.rank).to(x.device)
        before = self.stats.total()
        out = move_rows(
            x,
            self._moves[(a, b)],
            self.group,
            self.stats,
            step=f"layer {to if to is not None else frm}",
            timeout=self.timeout,
        )
        layer = to if to is not None else frm
        self.layer_bytes[layer] = self.layer_bytes.get(layer, 0) + self.stats.total() - before
        return out

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, N, H, D) un-rotated, in the layer's local order (the base sharding's, or with exchange
        'rows' the layer's holdings') -> attention output (B, N, H, D) in that order."""
        lay = self._layer(layer)
        plan = lay.plan
        tables = self._tables[self._held(plan.spec)]
        qr, kr = apply_rotary(q, tables), apply_rotary(k, tables)
        b, _, h, d = kr.shape
        before = self.stats.total()
        if plan.peers:
            kv = torch.cat([kr, v.to(kr.dtype)], dim=-1)  # (B, N_local, H, 2D): one message per peer
            halo = halo_exchange(kv, plan, self.group, self.stats, step=f"layer {layer}", timeout=self.timeout)
            hk, hv = halo[..., :d], halo[..., d:]  # (B, N_halo, H, D) each
        else:  # base grid: own windows only, no communication
            hk = hv = kr.new_empty(b, 0, h, d)
        self.layer_bytes[layer] = self.layer_bytes.get(layer, 0) + self.stats.total() - before
        k_rows, v_rows = [kr, hk], [v, hv.to(v.dtype)]  # (B, N_local + N_halo, H, D) in all
        if lay.proxy_index is not None:
            pk, pv = self._proxy_k[layer], self._proxy_v[layer]  # (B, U, H, D) kept rows
            k_rows.append(pk.expand(b, *pk.shape[1:]).to(kr.dtype))
            v_rows.append(pv.expand(b, *pv.shape[1:]).to(v.dtype))
        k_all, v_all = _row_table(k_rows), _row_table(v_rows)  # (B, N_local + N_halo + U, H, D)
        out = qr.new_empty(qr.shape)  # (B, N_local, H, D): every local row is one window's query exactly once
        for rows in lay.groups:  # windows of equal own-query and key counts: no padding slot, no mask
            gathered_windows_sdpa(qr, k_all, v_all, rows, out, self.config.max_window_batch)
        return out


def _row_table(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows concatenated along dim 1; the first part itself when the others are empty (no copy)."""
    parts = [parts[0]] + [p for p in parts[1:] if p.shape[1]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _kept_rows(proxy, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's proxy keys/values restricted to ``rows`` (B, U, H, D): selected here from every row, or
    recorded that way already (then they must be exactly these rows)."""
    recorded = proxy.rows[layer] if getattr(proxy, "rows", None) else None
    if recorded is None:
        rows = rows.to(proxy.keys[layer].device)
        return proxy.keys[layer].index_select(1, rows), proxy.values[layer].index_select(1, rows)
    if not torch.equal(recorded.cpu(), rows):
        raise ValueError(f"layer {layer}: the proxy keys/values were recorded for other rows than this rank reads")
    return proxy.keys[layer], proxy.values[layer]
