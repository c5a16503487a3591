"""Dense boolean masks that define the attention patterns; used by the reference backend and by tests.

They are built from token coordinates directly (window id = floor((coord + shift) / window) per axis), not from the
window-major permutation, so the fast backends are checked against an independent definition.
"""

from __future__ import annotations

import torch

from ...geometry.windows import WindowSpec


def window_ids(spec: WindowSpec) -> torch.Tensor:
    """(N,) linear window id of every raster token of ``spec.grid``."""
    g = spec.grid
    ids = []
    for n, w, s in zip(g.dims, spec.window, spec.shift):
        ids.append(torch.div(torch.arange(n) + s, w, rounding_mode="floor"))
    ct, ch, cw = spec.counts
    t, h, w = torch.meshgrid(*ids, indexing="ij")
    return ((t * ch + h) * cw + w).reshape(-1)


def detail_mask(spec: WindowSpec, proxy_tokens: int = 0, proxy_index: torch.Tensor | None = None) -> torch.Tensor:
    """(N, N + proxy_tokens) bool: detail query i may attend detail key j (same window) or proxy key p.

    ``proxy_index`` (num_windows, C) restricts each window to its aligned proxy region; None = all proxy tokens.
    """
    wid = window_ids(spec)
    n = wid.numel()
    same = wid[:, None] == wid[None, :]  # (N, N)
    if proxy_tokens == 0:
        return same
    if proxy_index is None:
        ctx = torch.ones(n, proxy_tokens, dtype=torch.bool)
    else:
        ctx = torch.zeros(spec.num_windows, proxy_tokens, dtype=torch.bool)
        ctx.scatter_(1, proxy_index, True)
        ctx = ctx[wid]  # (N, Np)
    return torch.cat([same, ctx], dim=1)


def aligned_table(num_windows: int, proxy_tokens: int, proxy_index: torch.Tensor) -> torch.Tensor:
    """(num_windows, proxy_tokens) bool: window w reads proxy token p."""
    table = torch.zeros(num_windows, proxy_tokens, dtype=torch.bool, device=proxy_index.device)
    return table.scatter_(1, proxy_index, True)
