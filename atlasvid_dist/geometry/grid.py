"""Token grids of the detail and proxy branches, and how proxy coordinates map into detail coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.video import VAE_TEMPORAL
from ..errors import check


@dataclass(frozen=True)
class Grid:
    """A (t, h, w) grid of tokens (or latent cells)."""

    t: int
    h: int
    w: int

    def __post_init__(self) -> None:
        check(all(isinstance(v, int) and v > 0 for v in (self.t, self.h, self.w)), "grid", self.dims,
              "every axis must be a positive integer")

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
class ProxyGeometry:
    """The proxy's grid and where its tokens sit in detail coordinates.

    Time: proxy latent frame j sits at detail latent frame j * r_t (the proxy is stretched, the detail keeps its
    positions). When (f - 1) is not a multiple of r_t, the proxy gets one more frame so that it covers the whole
    clip (its last frame lies just past the detail's last frame); the user's frame count is never changed.
    Space: proxy token i sits at detail token i * spatial_scale (the corner of the detail block under it).
    """

    detail: Grid
    """Detail token grid."""
    temporal_scale: int
    """r_t."""
    spatial_scale: int
    """Detail tokens per proxy token along height and width."""

    def __post_init__(self) -> None:
        s = self.spatial_scale
        check(self.detail.h % s == 0 and self.detail.w % s == 0, "spatial_scale", s,
              f"must divide the detail token grid {self.detail.h}x{self.detail.w} (h x w tokens); "
              f"divisors that work: {_common_divisors(self.detail.h, self.detail.w)}")

    @property
    def grid(self) -> Grid:
        f_p = math.ceil((self.detail.t - 1) / self.temporal_scale) + 1
        return Grid(f_p, self.detail.h // self.spatial_scale, self.detail.w // self.spatial_scale)

    @property
    def extended(self) -> bool:
        """True when the proxy extends past the clip's last frame (frame count not aligned with r_t)."""
        return (self.detail.t - 1) % self.temporal_scale != 0

    @property
    def scales(self) -> tuple[float, float, float]:
        return (float(self.temporal_scale), float(self.spatial_scale), float(self.spatial_scale))

    def latent_frames(self) -> int:
        return self.grid.t

    def pixel_frames(self) -> int:
        return (self.grid.t - 1) * VAE_TEMPORAL + 1


def _common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]
