"""Self-attention of one forward pass: full, atlas (windows + proxy) or ultragen (windows + compressed global).

``DetailAttention`` is built once per forward from the geometry and called by every block with that block's
un-rotated q, k, v (B, N, H, D) in raster token order. It applies RoPE, reorders tokens window-major for the
layer's grid, runs the chosen backend, and returns the output in raster order (the SDPA backend gathers one chunk
of windows at a time from the raster rows and writes its output rows straight back: no whole-layer reorder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...config.method import AtlasConfig
from ...errors import InputError
from ...geometry.grid import Grid, ProxyAnchor
from ...geometry.windows import WindowSpec, proxy_regions, window_layout
from ..rope import Rotary3D, RotaryTables, apply_rotary
from . import masks
from .kernels import WindowRows, gathered_windows_sdpa, group_windows, reference_attention, sdpa


@dataclass
class ProxyKV:
    """Per-layer proxy keys (RoPE at detail coordinates) and values, each (B, Np, H, D), and the proxy grid.

    ``rows[layer]`` is None when the layer keeps every proxy token (Np = the grid's size, raster order); a rank of
    the window-sharded runtime keeps only the rows its windows read, and then ``rows[layer]`` holds their raster
    ids (Np of them, in the order of ``keys[layer]``'s second axis)."""

    grid: Grid
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor | None] = field(default_factory=list)

    def partial(self) -> bool:
        """True when some layer keeps only some proxy rows."""
        return any(r is not None for r in self.rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass(frozen=True)
class LayerWindows:
    """Index tensors of one layer's window grid, on the compute device."""

    spec: WindowSpec
    order: torch.Tensor
    inverse: torch.Tensor
    valid: torch.Tensor
    proxy_index: torch.Tensor | None


def window_rows(lw: LayerWindows, proxy_rows: int) -> tuple[WindowRows, ...]:
    """The layer's windows grouped by their number of real tokens (kernels.group_windows), each window's keys
    extended by ``proxy_rows`` proxy rows (the aligned region of each window, or every proxy row when the layer
    has no proxy index). An unpadded grid is one group."""
    nw, lt = lw.valid.shape
    slots = lw.order.view(nw, lt)  # (W, L) raster ids, grid.size at padding
    extra = None
    if proxy_rows:
        index = lw.proxy_index
        if index is None:  # 'all': every window reads every proxy row
            index = torch.arange(proxy_rows, device=slots.device).expand(nw, proxy_rows)
        extra = lw.spec.grid.size + index  # (W, C) rows after the raster rows
    return group_windows(slots, lw.valid, slots, lw.valid, extra)


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> 'sdpa' (windows in the batch dimension: CPU and CUDA, trains). 'flex' needs CUDA for speed."""
    return "sdpa" if name == "auto" else name


class AttentionGeometry:
    """What the attention of every forward on one grid shares, built on the device once and kept (the wrapper
    keeps the last one): RoPE tables of the grid, each layer grid's window index tensors, UltraGen's cell tables.
    Depends only on the config, the grid, the proxy grid and scales, and the device."""

    def __init__(self, config: AtlasConfig, grid: Grid, rotary: Rotary3D, device, proxy_grid: Grid | None, scales):
        self.config, self.grid, self.rotary, self.device = config, grid, rotary, torch.device(device)
        self.proxy_grid, self.scales = proxy_grid, scales
        self.tables = rotary.for_grid(grid).to(device)
        self._layers: dict[WindowSpec, LayerWindows] = {}
        self._cells: dict[tuple, RotaryTables] = {}
        self._rows: dict[tuple, tuple[WindowRows, ...]] = {}

    def key(self) -> tuple:
        return self.key_of(self.config, self.grid, self.device, self.proxy_grid, self.scales)

    @staticmethod
    def key_of(config: AtlasConfig, grid: Grid, device, proxy_grid: Grid | None, scales) -> tuple:
        """What a geometry depends on: two forwards with the same key share one."""
        return config, grid, str(torch.device(device)), proxy_grid, scales

    def layer_spec(self, layer: int) -> WindowSpec:
        entries = self.config.layer_entries()
        window, shift = entries[layer % len(entries)]
        return WindowSpec(self.grid, window, shift, pad=self.config.pad_windows)

    def layer_windows(self, layer: int) -> LayerWindows:
        spec = self.layer_spec(layer)
        if spec not in self._layers:
            lay = window_layout(spec)
            index = None
            if self.proxy_grid is not None and self.config.proxy_context == "aligned":
                index, _ = proxy_regions(spec, self.proxy_grid, self.scales, self.config.proxy_margin)
                index = index.to(self.device)
            self._layers[spec] = LayerWindows(
                spec, lay.order.to(self.device), lay.inverse.to(self.device), lay.valid.to(self.device), index
            )
        return self._layers[spec]

    def window_rows(self, layer: int, proxy_rows: int) -> tuple["WindowRows", ...]:
        """The layer's windows as rows of [its own rows | ``proxy_rows`` proxy rows] (kept per grid and count)."""
        spec = self.layer_spec(layer)
        if (spec, proxy_rows) not in self._rows:
            self._rows[spec, proxy_rows] = window_rows(self.layer_windows(layer), proxy_rows)
        return self._rows[spec, proxy_rows]

    def cell_tables(self, pool) -> RotaryTables:
        """RoPE tables at UltraGen's pooling cells' centres."""
        if pool not in self._cells:
            self._cells[pool] = self.rotary.tables(pooled_positions(self.grid, pool)).to(self.device)
        return self._cells[pool]


class DetailAttention:
    """Attention for the detail tokens of one forward pass (see module docstring)."""

    def __init__(
        self,
        config: AtlasConfig,
        grid: Grid,
        rotary: Rotary3D,
        device: torch.device,
        proxy: ProxyKV | None = None,
        scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
        geometry: AttentionGeometry | None = None,
    ):
        """``geometry``: an :class:`AttentionGeometry` of these arguments kept from an earlier forward (one is
        built otherwise)."""
        if proxy is not None and proxy.partial():
            raise InputError("proxy: these keys/values keep only one rank's rows; the whole grid reads all of them")
        self.config, self.grid, self.rotary, self.device = config, grid, rotary, device
        self.proxy, self.scales = proxy, scales
        self.backend = resolve_backend(config.backend, device)
        pgrid = None if proxy is None else proxy.grid
        self.geometry = geometry or AttentionGeometry(config, grid, rotary, device, pgrid, scales)
        if self.geometry.key() != AttentionGeometry.key_of(config, grid, device, pgrid, scales):
            raise ValueError("geometry: built for another grid, proxy, device or config than this forward's")
        self.tables = self.geometry.tables

    # -- geometry ---------------------------------------------------------------------------------------------
    def layer_spec(self, layer: int) -> WindowSpec:
        return self.geometry.layer_spec(layer)

    def layer_windows(self, layer: int) -> LayerWindows:
        return self.geometry.layer_windows(layer)

    # -- entry point --------------------------------------------------------------------------------------------
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, N, H, D) un-rotated, raster order -> attention output (B, N, H, D)."""
        qr, kr = apply_rotary(q, self.tables), apply_rotary(k, self.tables)
        if self.config.mode == "full":
            return self._full(qr, kr, v)
        local = self._windows(layer, qr, kr, v)
        if self.config.mode == "atlas":
            return local
        w = self.config.ultragen_weight
        return (1.0 - w) * local + w * self._compressed_global(q, k, v)

    def _full(self, q, k, v):
        if self.backend == "reference":
            return reference_attention(q, k, v)
        return sdpa(q, k, v)

    # -- windows ------------------------------------------------------------------------------------------------
    def _proxy_kv(self, layer: int):
        if self.proxy is None or self.config.mode != "atlas":
            return None, None
        return self.proxy.keys[layer], self.proxy.values[layer]

    def _windows(self, layer: int, q, k, v):
        lw = self.layer_windows(layer)
        pk, pv = self._proxy_kv(layer)
        if self.backend == "reference":
            return self._windows_reference(lw, q, k, v, pk, pv)
        if self.backend == "flex":
            return self._windows_flex(lw, q, k, v, pk, pv)
        groups = self.geometry.window_rows(layer, 0 if pk is None else pk.shape[1])
        if pk is not None:  # key/value rows: the layer's own, then the proxy's
            k, v = torch.cat([k, pk], dim=1), torch.cat([v, pv], dim=1)  # (B, N + Np, H, D)
        out = q.new_empty(q.shape)  # (B, N, H, D) contiguous: every raster row is one window's query exactly once
        for rows in groups:  # windows of one length: no padding slot computed, no mask
            gathered_windows_sdpa(q, k, v, rows, out, self.config.max_window_batch)
        return out

    @staticmethod
    def _windows_flex(lw: LayerWindows, q, k, v, pk, pv):
        from .flex import flex_windows

        b, n, h, d = q.shape
        nw, lt = lw.valid.shape
        pad = q.new_zeros(b, 1, h, d)

        def to_windows(x):  # (B, N, H, D) -> (B, W, L, H, D), padding slots = zeros
            return torch.cat([x, pad], dim=1)[:, lw.order].unflatten(1, (nw, lt))

        table = None
        if pk is not None and lw.proxy_index is not None:
            table = masks.aligned_table(nw, pk.shape[1], lw.proxy_index)
        key = (lw.spec, None if pk is None else (pk.shape[1], lw.proxy_index is not None), str(q.device))
        out = flex_windows(to_windows(q), to_windows(k), to_windows(v), lw.valid, pk, pv, table, key)
        return out.flatten(1, 2)[:, lw.inverse]  # (B, N, H, D) raster order

    def _windows_reference(self, lw: LayerWindows, q, k, v, pk, pv):
        np_ = 0 if pk is None else pk.shape[1]
        index = None if lw.proxy_index is None else lw.proxy_index.cpu()
        mask = masks.detail_mask(lw.spec, np_, index).to(q.device)
        if pk is not None:
            k, v = torch.cat([k, pk], dim=1), torch.cat([v, pv], dim=1)
        return reference_attention(q, k, v, mask)

    # -- ultragen global branch ---------------------------------------------------------------------------------
    def _compressed_global(self, q, k, v):
        """UltraGen's compressed global branch: dense attention among pooled tokens, repeated back to full size.

        q, k, v (B, N, H, D) un-rotated are average-pooled over (t, h, w) cells of ``ultragen_pool`` (pooling comes
        before RoPE: a pooled token is a token at its cell centre, rotated there); the N' pooled queries attend the
        N' pooled keys; each token takes its cell's output (nearest upsampling). A grid axis the pool does not
        divide ends in a smaller cell (ceil), averaged over its real tokens; upsampling crops it back.
        """
        pool = ultragen_cells(self.grid, self.config.ultragen_pool)
        tables = self._cell_tables(pool)
        qp = apply_rotary(pool_tokens(q, self.grid, pool), tables)  # (B, N', H, D)
        kp = apply_rotary(pool_tokens(k, self.grid, pool), tables)
        vp = pool_tokens(v, self.grid, pool)
        out = reference_attention(qp, kp, vp) if self.backend == "reference" else sdpa(qp, kp, vp)
        return upsample_cells(out, self.grid, pool)  # (B, N, H, D): every token takes its cell's output

    def _cell_tables(self, pool) -> RotaryTables:
        """RoPE tables at the pooling cells' centres (kept with the geometry)."""
        return self.geometry.cell_tables(pool)


def ultragen_cells(grid: Grid, pool) -> tuple[int, int, int]:
    """The pooling cell (t, h, w) on ``grid``: ``pool`` clipped to the grid (an axis shorter than the pool is one cell)."""
    return tuple(min(p, n) for p, n in zip(pool, grid.dims))  # type: ignore[return-value]


def pool_tokens(x: torch.Tensor, grid: Grid, pool) -> torch.Tensor:
    """(B, N, H, D) raster tokens -> (B, N', H, D) averages over ``pool`` cells in raster cell order (ceil)."""
    b, _, h, d = x.shape
    x5 = x.permute(0, 2, 3, 1).reshape(b, h * d, *grid.dims)  # (B, H*D, t, h, w)
    y = F.avg_pool3d(x5, kernel_size=pool, stride=pool, ceil_mode=True)  # (B, H*D, t', h', w')
    # contiguous: fused SDPA kernels need a unit stride on head_dim (else a dense math fallback)
    return y.flatten(2).reshape(b, h, d, -1).permute(0, 3, 1, 2).contiguous()  # (B, N', H, D)


def upsample_cells(x: torch.Tensor, grid: Grid, pool) -> torch.Tensor:
    """(B, N', H, D) per pooling cell -> (B, N, H, D): each cell's row repeated over its tokens, cropped to the grid
    (nearest upsampling; an expand, so its backward is a plain sum: deterministic on CUDA)."""
    b, _, h, d = x.shape
    cells = [-(-n // p) for n, p in zip(grid.dims, pool)]
    x = x.reshape(b, cells[0], 1, cells[1], 1, cells[2], 1, h, d)  # (B, t', 1, h', 1, w', 1, H, D)
    x = x.expand(b, cells[0], pool[0], cells[1], pool[1], cells[2], pool[2], h, d)
    x = x.reshape(b, *(c * p for c, p in zip(cells, pool)), h, d)  # (B, t'*pt, h'*ph, w'*pw, H, D)
    return x[:, : grid.t, : grid.h, : grid.w].reshape(b, grid.size, h, d)  # crop, raster (B, N, H, D)


def pooled_positions(grid: Grid, pool) -> torch.Tensor:
    """(N', 3) float64 centre of every pooling cell (a clipped last cell is centred on its real tokens)."""
    axes = []
    for n, p in zip(grid.dims, pool):
        lo = torch.arange(0, n, p, dtype=torch.float64)
        hi = torch.clamp(lo + p, max=n)
        axes.append((lo + hi - 1) / 2)
    t, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def proxy_rotary_tables(rotary: Rotary3D, grid: Grid, scales) -> RotaryTables:
    """Tables for proxy tokens at their detail positions (:class:`ProxyAnchor` of ``scales`` (r_t, s, s))."""
    return rotary.tables(ProxyAnchor(int(scales[0]), int(scales[1])).positions(grid))
