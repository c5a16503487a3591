"""Reordered spatiotemporal windows: the window grid of a layer, the window-major permutation and its inverse,
and the proxy region each window reads.

A layer's grid is a window size and a shift (in tokens). Window borders sit at ``i * window - shift`` on each
axis, so a shifted grid has partial windows at both borders; in the layout those (and a grid that does not
divide) are padded to full windows with a sentinel index. One process attends inside them at their real lengths
(windows grouped by length); a rank of the window-sharded runtime masks the padding keys. An axis whose window spans the whole grid is never
shifted (a shift there would only split one window into two partial ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config.model import WAN_BASE
from ..errors import check
from .grid import Grid, ProxyAnchor, divisors

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class WindowSpec:
    """One layer's window grid over a token grid."""

    grid: Grid
    """Token grid being windowed."""
    window: Triple
    """Window size in tokens (t, h, w)."""
    shift: Triple = (0, 0, 0)
    """Offset of the window borders in tokens (t, h, w); 0 <= shift < window."""
    pad: bool = False
    """Allow padding where the window does not divide the grid (shifted grids are always padded)."""

    def __post_init__(self) -> None:
        names = ("t", "h", "w")
        shift = list(self.shift)
        for ax, (n, w, s) in enumerate(zip(self.grid.dims, self.window, self.shift)):
            check(w <= n, f"window.{names[ax]}", w, f"must not exceed the token grid's {names[ax]} = {n}")
            check(0 <= s < w, f"shift.{names[ax]}", s, f"must be in [0, window.{names[ax]} = {w})")
            if w == n:
                shift[ax] = 0
            elif s == 0 and not self.pad:
                check(
                    n % w == 0,
                    f"window.{names[ax]}",
                    w,
                    f"does not tile the token grid's {names[ax]} = {n} (token grid {self.grid.dims}); choose a "
                    f"divisor ({divisors(n)}) or allow padding (pad_windows)",
                )
        object.__setattr__(self, "shift", tuple(shift))

    @property
    def counts(self) -> Triple:
        """Windows per axis."""
        return tuple(math.ceil((n + s) / w) for n, w, s in zip(self.grid.dims, self.window, self.shift))

    @property
    def num_windows(self) -> int:
        return math.prod(self.counts)

    @property
    def window_tokens(self) -> int:
        return math.prod(self.window)

    @property
    def padded(self) -> bool:
        return any(c * w != n for c, w, n in zip(self.counts, self.window, self.grid.dims))

    def axis_lengths(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Real tokens of every window along each axis (a padded axis cuts its first and last windows)."""
        return tuple(
            tuple(min(n, (i + 1) * w - s) - max(0, i * w - s) for i in range(c))
            for n, w, s, c in zip(self.grid.dims, self.window, self.shift, self.counts)
        )  # type: ignore[return-value]

    def real_token_pairs(self) -> int:
        """Sum over windows of (real tokens)^2: the query-key pairs of attention inside unpadded windows (a window's
        real tokens are the product of its lengths along the three axes, so the sum factorises per axis)."""
        return math.prod(sum(x * x for x in axis) for axis in self.axis_lengths())

    def starts(self) -> torch.Tensor:
        """(num_windows, 3) first token coordinate of every window (may be negative in shifted grids)."""
        axes = [torch.arange(c) * w - s for c, w, s in zip(self.counts, self.window, self.shift)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass(frozen=True)
class WindowLayout:
    """Index tensors of one :class:`WindowSpec`; build with :func:`window_layout` (cached)."""

    spec: WindowSpec
    order: torch.Tensor
    """(num_windows * window_tokens,) raster token index for every window-major slot; ``grid.size`` = padding."""
    inverse: torch.Tensor
    """(grid.size,) window-major slot of every raster token."""
    valid: torch.Tensor
    """(num_windows, window_tokens) bool, False at padding slots."""

    @property
    def num_windows(self) -> int:
        return self.spec.num_windows

    @property
    def window_tokens(self) -> int:
        return self.spec.window_tokens


@lru_cache(maxsize=64)
def window_layout(spec: WindowSpec) -> WindowLayout:
    """Vectorised window-major permutation for ``spec`` (CPU tensors; move them with ``.to(device)``)."""
    g, n = spec.grid, spec.grid.size
    coords = []
    for size, w, s, c in zip(g.dims, spec.window, spec.shift, spec.counts):
        x = torch.arange(c * w) - s  # padded axis -> real coordinate
        coords.append((x, (x >= 0) & (x < size)))
    (t, vt), (h, vh), (w, vw) = coords
    raster = (t[:, None, None] * g.h + h[None, :, None]) * g.w + w[None, None, :]  # (Tp, Hp, Wp)
    ok = vt[:, None, None] & vh[None, :, None] & vw[None, None, :]
    raster = torch.where(ok, raster, torch.full_like(raster, n))
    (ct, ch, cw), (wt, wh, ww) = spec.counts, spec.window
    # (ct, wt, ch, wh, cw, ww) -> (ct, ch, cw, wt, wh, ww): windows major, tokens within a window in raster order
    order = raster.reshape(ct, wt, ch, wh, cw, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1)
    valid = order < n
    inverse = torch.empty(n, dtype=torch.long)
    inverse[order[valid]] = torch.arange(order.numel())[valid]
    return WindowLayout(spec, order, inverse, valid.reshape(spec.num_windows, spec.window_tokens))


def proxy_regions(spec: WindowSpec, proxy: Grid, scales: Triple, margin: Triple) -> tuple[torch.Tensor, Triple]:
    """Proxy region (aligned context) of every window.

    Returns ``(index, size)``: index (num_windows, prod(size)) raster indices into the proxy grid, and the region
    size per axis. The region covers the proxy tokens above the window's real tokens plus ``margin`` on each
    side; it has the same size for every window (clamped inside the proxy grid) so windows batch together.
    """
    check(
        scales[1] == scales[2] and all(float(r).is_integer() for r in scales),
        "scales",
        scales,
        "must be integers, equal in h and w",
    )
    anchor = ProxyAnchor(int(scales[0]), int(scales[1]))
    starts = spec.starts()  # (n_win, 3)
    axes, sizes = [], []
    for ax in range(3):
        w, r, m, np_ = spec.window[ax], anchor.scale(ax), margin[ax], proxy.dims[ax]
        size = min(np_, math.ceil(w / r) + 1 + 2 * m)
        lo = starts[:, ax].clamp(min=0)
        first = anchor.covering(lo, ax).long() - m  # the proxy cell whose covered block holds the window's start
        first = first.clamp(min=0, max=np_ - size)
        axes.append(first[:, None] + torch.arange(size)[None, :])  # (n_win, size)
        sizes.append(size)
    t, h, w = axes
    index = (t[:, :, None, None] * proxy.h + h[:, None, :, None]) * proxy.w + w[:, None, None, :]
    return index.reshape(spec.num_windows, -1), tuple(sizes)  # type: ignore[return-value]


DEFAULT_WINDOW: Triple = WAN_BASE.window
"""The window the method starts from: it tiles 720P, 2K, 4K and 8K token grids in space (docs/method.md)."""


def auto_window(grid: Grid, target: Triple = DEFAULT_WINDOW) -> tuple[Triple, bool]:
    """A window near ``target`` that tiles ``grid``, and whether padding is still needed.

    Per axis: the divisor of the axis closest to the target within [target/2, 2*target] (the smaller one on a tie);
    an axis with none keeps the target and the window is padded (masked). 720P/2K/4K/8K keep (3, 15, 16); Wan's
    480p (30 x 52 tokens) gets (3, 15, 13); 1080p (68 x 120) gets (3, 17, 15).
    """
    out, pad = [], False
    for n, want in zip(grid.dims, target):
        size = _axis_window(n, want)
        pad = pad or size is None
        out.append(want if size is None else size)
    return tuple(out), pad  # type: ignore[return-value]


def _axis_window(n: int, want: int) -> int | None:
    if n <= want:
        return n  # the whole axis
    near = [d for d in divisors(n) if (want + 1) // 2 <= d <= 2 * want]
    return min(near, key=lambda d: (abs(d - want), d)) if near else None
