"""Attention FLOPs of one layer, from the same geometry the kernels run on.

Convention: one attention over Lq queries and Lk keys costs 4 * Lq * Lk * heads * head_dim FLOPs (QK^T and PV,
a multiply-add counted as 2). Window attention counts what the SDPA kernel executes, on one device or a rank: the
windows of a padded (e.g. shifted) grid run at their real lengths, so only real query-key pairs count, plus every
real query against its window's proxy context.
UltraGen's compressed global branch is dense attention among the N' pooled tokens: 4 * N'^2 * heads * head_dim
(pooling and upsampling are averages and copies, memory traffic rather than FLOPs).
"""

from __future__ import annotations

import math

from ..config.method import AtlasConfig
from ..geometry.grid import Grid, ProxyGeometry
from ..geometry.windows import WindowSpec, proxy_regions


def attention_flops(lq: int, lk: int, heads: int, head_dim: int) -> int:
    return 4 * lq * lk * heads * head_dim


def pooled_tokens(cfg: AtlasConfig, grid: Grid) -> int:
    """N': UltraGen pooling cells on ``grid`` (ceil per axis; an axis shorter than the pool is one cell)."""
    return math.prod(-(-n // min(p, n)) for p, n in zip(cfg.ultragen_pool, grid.dims))


def proxy_context_tokens(cfg: AtlasConfig, spec: WindowSpec, proxy: Grid) -> int:
    """Proxy keys one window reads: all of them, or the aligned region (same size for every window)."""
    if cfg.proxy_context == "all":
        return proxy.size
    s = float(cfg.spatial_scale)
    _, size = proxy_regions(spec, proxy, (float(cfg.temporal_scale), s, s), cfg.proxy_margin)
    return math.prod(size)


def pair_flops(pairs: int, queries: int, ctx: int, heads: int, head_dim: int) -> int:
    """Windowed attention of ``pairs`` real query-key pairs inside windows, each of ``queries`` real queries also
    reading ``ctx`` proxy keys."""
    return 4 * (pairs + queries * ctx) * heads * head_dim


def window_attention_flops(spec: WindowSpec, ctx: int, heads: int, head_dim: int) -> int:
    """Windows of ``spec`` at their real lengths, each real query also reading ``ctx`` proxy keys."""
    return pair_flops(spec.real_token_pairs(), spec.grid.size, ctx, heads, head_dim)


def layer_spec(cfg: AtlasConfig, grid: Grid, layer: int) -> WindowSpec:
    entries = cfg.layer_entries()
    window, shift = entries[layer % len(entries)]
    return WindowSpec(grid, window, shift, pad=cfg.pad_windows)


def layer_attention_flops(
    cfg: AtlasConfig, grid: Grid, heads: int, head_dim: int, layer: int = 0, with_proxy: bool = True
) -> int:
    """Self-attention FLOPs of the detail tokens in ``layer`` for ``cfg.mode`` (full / atlas / ultragen)."""
    if cfg.mode == "full":
        return attention_flops(grid.size, grid.size, heads, head_dim)
    spec = layer_spec(cfg, grid, layer)
    ctx = 0
    if cfg.mode == "atlas" and with_proxy:
        ctx = proxy_context_tokens(cfg, spec, ProxyGeometry(grid, cfg.temporal_scale, cfg.spatial_scale).grid)
    flops = window_attention_flops(spec, ctx, heads, head_dim)
    if cfg.mode == "ultragen":
        pooled = pooled_tokens(cfg, grid)
        flops += attention_flops(pooled, pooled, heads, head_dim)
    return flops
