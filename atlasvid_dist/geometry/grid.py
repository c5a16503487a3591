"""Token grids of the detail and proxy branches, and how proxy coordinates map into detail coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config.video import VAE_TEMPORAL
from ..errors import check


@dataclass(frozen=True)
class Grid:
    """A (t, h, w) grid of tokens (or latent cells)."""

    t: int
    h: int
    w: int

    def __post_init__(self) -> None:
        check(
            all(isinstance(v, int) and v > 0 for v in (self.t, self.h, self.w)),
            "grid",
            self.dims,
            "every axis must be a positive integer",
        )

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.t, self.h, self.w)

    @property
    def size(self) -> int:
        return self.t * self.h * self.w


def latent_grid(frames: int, height: int, width: int) -> Grid:
    """Pixels -> VAE latent cells: 4x in time after the first frame, 8x in space."""
    return Grid((frames - 1) // VAE_TEMPORAL + 1, height // 8, width // 8)


def token_grid(latent: Grid, patch: tuple[int, int, int] = (1, 2, 2)) -> Grid:
    """Latent cells -> transformer tokens (patch (1, 2, 2) for Wan2.1)."""
    for ax, (n, p) in enumerate(zip(latent.dims, patch)):
        check(n % p == 0, f"latent_grid[{ax}]", n, f"must be divisible by the patch size {p}")
    return Grid(latent.t // patch[0], latent.h // patch[1], latent.w // patch[2])


@dataclass(frozen=True)
class ProxyAnchor:
    """THE place where a proxy cell sits in detail coordinates (one convention for every use).

    Time: proxy latent frame j sits at detail latent frame ``j * r_t``.
    Space: proxy cell i sits at the centre of the s x s detail block it covers, ``i * s + (s - 1) / 2`` (a
    fractional position is fine for RoPE: cos/sin of position x frequency).

    The same anchor holds for tokens and for latent cells (both grids shrink by the same s), and is used by
    (1) the proxy keys' RoPE positions that detail queries read (models/atlas_transformer.py),
    (2) the aligned proxy region of a window (geometry/windows.py ``proxy_regions``), through :meth:`covering`,
    (3) ``--detail-init proxy`` upsampling (:func:`upsample_proxy`, pipeline/generate.py).
    """

    temporal_scale: int
    spatial_scale: int

    def scale(self, axis: int) -> int:
        return self.temporal_scale if axis == 0 else self.spatial_scale

    def offset(self, axis: int) -> float:
        """Anchor minus the start of the covered block: 0 in time, (s - 1) / 2 in space (block centre)."""
        return 0.0 if axis == 0 else (self.spatial_scale - 1) / 2.0

    def detail_position(self, index, axis: int):
        """Detail coordinate of proxy index ``index`` (int, float or tensor) along ``axis`` (0 t, 1 h, 2 w)."""
        return index * self.scale(axis) + self.offset(axis)

    def covering(self, coord, axis: int):
        """Proxy index whose covered block holds detail coordinate ``coord`` (int or integer tensor).

        Proxy index i covers ``[detail_position(i) - offset, + scale)`` = ``[i * scale, (i + 1) * scale)``: the
        s x s block under it in space (centre anchor) and, in time, detail frames from its own up to the next
        proxy frame's.
        """
        start0 = self.detail_position(0, axis) - self.offset(axis)
        scale = self.scale(axis)
        if isinstance(coord, int):
            return int(math.floor((coord - start0) / scale))
        return torch.div(coord - int(start0), scale, rounding_mode="floor")

    def positions(self, proxy: Grid):
        """(N, 3) float64 detail positions of every proxy token in raster (t, h, w) order."""
        axes = [self.detail_position(torch.arange(n, dtype=torch.float64), ax) for ax, n in enumerate(proxy.dims)]
        t, h, w = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def upsample_proxy(proxy, anchor: ProxyAnchor, size: tuple[int, int, int]):
    """Proxy latents (B, C, f_p, h_p, w_p) -> (B, C, *size) on the detail latent grid, placed by ``anchor``.

    Separable linear interpolation: detail cell x along an axis reads the proxy at fractional index u with
    ``anchor.detail_position(u) == x`` (clamped to the proxy's first and last cell). In time proxy frame j lands
    exactly on detail frame j * r_t; in space this equals bilinear interpolation with align_corners=False.
    """
    out = proxy.float()
    for ax, n in enumerate(size):
        n_p = out.shape[2 + ax]
        x = torch.arange(n, dtype=torch.float64)
        u = ((x - anchor.offset(ax)) / anchor.scale(ax)).clamp(0, n_p - 1)  # inverse of detail_position
        lo = u.floor().long().clamp(max=n_p - 1)
        hi = (lo + 1).clamp(max=n_p - 1)
        frac = (u - lo).float()
        weights = torch.zeros(n, n_p, dtype=torch.float32)
        weights[torch.arange(n), lo] += 1 - frac
        weights[torch.arange(n), hi] += frac
        out = torch.movedim(torch.movedim(out, 2 + ax, -1) @ weights.T.to(out.device), -1, 2 + ax)
    return out


@dataclass(frozen=True)
class ProxyGeometry:
    """The proxy's grid and where its tokens sit in detail coordinates (:class:`ProxyAnchor`).

    Time: proxy latent frame j sits at detail latent frame j * r_t (the proxy is stretched, the detail keeps its
    positions). When (f - 1) is not a multiple of r_t, the proxy gets one more frame so that it covers the whole
    clip (its last frame lies just past the detail's last frame); the user's frame count is never changed.
    Space: proxy token i sits at detail position i * s + (s - 1) / 2, the centre of the s x s detail block under it.
    """

    detail: Grid
    """Detail token grid."""
    temporal_scale: int
    """r_t."""
    spatial_scale: int
    """Detail tokens per proxy token along height and width."""

    def __post_init__(self) -> None:
        s = self.spatial_scale
        check(
            self.detail.h % s == 0 and self.detail.w % s == 0,
            "spatial_scale",
            s,
            f"must divide the detail token grid {self.detail.h}x{self.detail.w} (h x w tokens); "
            f"divisors that work: {_common_divisors(self.detail.h, self.detail.w)}",
        )

    @property
    def grid(self) -> Grid:
        f_p = math.ceil((self.detail.t - 1) / self.temporal_scale) + 1
        return Grid(f_p, self.detail.h // self.spatial_scale, self.detail.w // self.spatial_scale)

    @property
    def extended(self) -> bool:
        """True when the proxy extends past the clip's last frame (frame count not aligned with r_t)."""
        return (self.detail.t - 1) % self.temporal_scale != 0

    @property
    def anchor(self) -> ProxyAnchor:
        return ProxyAnchor(self.temporal_scale, self.spatial_scale)

    def detail_position(self, index, axis: int):
        """Detail coordinate of proxy token ``index`` along ``axis``; see :class:`ProxyAnchor`."""
        return self.anchor.detail_position(index, axis)

    @property
    def scales(self) -> tuple[float, float, float]:
        return (float(self.temporal_scale), float(self.spatial_scale), float(self.spatial_scale))

    def latent_frames(self) -> int:
        return self.grid.t

    def pixel_frames(self) -> int:
        return (self.grid.t - 1) * VAE_TEMPORAL + 1


def divisors(n: int) -> list[int]:
    """Every divisor of ``n`` >= 1, ascending (the one helper for messages and choices that need them)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]
