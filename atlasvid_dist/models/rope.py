"""3D rotary position embedding from per-axis, possibly fractional, positions.

Wan2.1 splits a head's channels into (time, height, width) parts (44/42/42 of 128) and rotates channel pairs by
``position * theta ** (-2i / dim)``. Here positions are an explicit (N, 3) tensor built with a scale and offset
per axis, so the proxy can sit at ``j * r_t`` in time (temporally scaled RoPE) and at ``i * spatial_scale`` in
space (detail coordinates). With scale 1 and offset 0 the tables equal diffusers' ``WanRotaryPosEmbed`` exactly
(same float64 arithmetic, same cast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry.grid import Grid


def grid_positions(grid: Grid, scale=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """(N, 3) float64 positions of a grid's tokens in raster (t, h, w) order: ``index * scale + offset``."""
    axes = [torch.arange(n, dtype=torch.float64) * s + o for n, s, o in zip(grid.dims, scale, offset)]
    t, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


@dataclass(frozen=True)
class RotaryTables:
    """cos/sin of every (token, channel pair): each (N, head_dim // 2), float32."""

    cos: torch.Tensor
    sin: torch.Tensor

    def to(self, device) -> "RotaryTables":
        return RotaryTables(self.cos.to(device), self.sin.to(device))

    def index(self, idx: torch.Tensor) -> "RotaryTables":
        return RotaryTables(self.cos[idx], self.sin[idx])


@dataclass(frozen=True)
class Rotary3D:
    """Frequencies of Wan's 3D RoPE for one head size."""

    head_dim: int
    theta: float = 10000.0

    @property
    def axis_dims(self) -> tuple[int, int, int]:
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    def tables(self, positions: torch.Tensor) -> RotaryTables:
        """positions (N, 3) float64 -> tables for :func:`apply_rotary`."""
        angles = []
        for ax, dim in enumerate(self.axis_dims):
            freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
            angles.append(torch.outer(positions[:, ax].to(torch.float64), freqs))  # (N, dim/2)
        a = torch.cat(angles, dim=1)  # (N, head_dim/2)
        return RotaryTables(a.cos().float(), a.sin().float())

    def for_grid(self, grid: Grid, scale=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0)) -> RotaryTables:
        return self.tables(grid_positions(grid, scale, offset))

    def for_tokens(self, grid: Grid, index: torch.Tensor) -> RotaryTables:
        """Tables of the grid's tokens ``index`` (raster ids) in that order: a rank's own tokens, without building
        the whole grid's tables (N x head_dim x 4 bytes; 1.4 GB at 8K x 81 for head_dim 128)."""
        return self.tables(grid_positions(grid)[index.cpu()])


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate channel pairs of x (B, N, H, D) by tables of N tokens; returns x's dtype (diffusers' arithmetic)."""
    cos = tables.cos[None, :, None, :]  # (1, N, 1, D/2)
    sin = tables.sin[None, :, None, :]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, H, D/2) each
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
