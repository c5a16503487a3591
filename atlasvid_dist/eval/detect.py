"""Finding the object in one frame: pixels far from the background colour, their connected components, and the
largest one's colour, fill ratio, sub-pixel centroid and edge sharpness.

The background colour is the per-channel median of the frame (the object covers a few percent of it). A pixel is
foreground when its RGB distance from the background exceeds half the smallest distance between a world colour and
the world background (so an anti-aliased edge pixel counts when it is more than about half covered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..world import BACKGROUND, COLOURS
from .components import label_components
from .metrics import luma

THRESHOLD = 0.5 * min(float(np.linalg.norm(np.subtract(c, BACKGROUND))) for c in COLOURS.values())
"""RGB distance from the background above which a pixel is foreground."""
MIN_AREA_FRACTION = 1 / 2000
"""Components smaller than this fraction of the frame (and than 2 pixels) are specks, not objects."""
SQUARE_FILL = 0.5 * (1 + np.pi / 4)
"""Fill ratio of the bounding box above which the object is a square (square 1, disc pi/4)."""


@dataclass(frozen=True)
class FrameObject:
    """The largest object found in one frame."""

    count: int
    """Objects (components of at least the minimum area) in the frame."""
    background: tuple[float, float, float]
    """Estimated background RGB (per-channel median of the frame)."""
    mask: np.ndarray
    """(H, W) bool: the largest object's foreground pixels."""
    rgb: tuple[float, float, float]
    """Mean RGB of the object's interior pixels (all of its pixels when it has no interior)."""
    fill: float
    """Foreground pixels / bounding-box pixels."""
    centre: tuple[float, float]
    """Coverage-weighted centroid (x, y) in pixels (pixel (i, j) has its centre at (j + 0.5, i + 0.5))."""
    sharpness: float
    """Mean luma gradient magnitude on the object's boundary divided by the object/background luma contrast
    (per pixel: about 1 for a one-pixel edge, lower when blurred)."""


def nearest_colour(rgb) -> str:
    """The world colour nearest to ``rgb`` (Euclidean in RGB)."""
    return min(COLOURS, key=lambda c: float(np.linalg.norm(np.subtract(rgb, COLOURS[c]))))


def dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    """Dilate by a (2 reach + 1) square."""
    h, w = mask.shape
    pad = np.pad(mask, reach)
    out = np.zeros_like(mask)
    for dy in range(2 * reach + 1):
        for dx in range(2 * reach + 1):
            out |= pad[dy : dy + h, dx : dx + w]
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (or the frame)."""
    pad = np.pad(mask, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return mask & ~inner


def _centroid(frame: np.ndarray, mask: np.ndarray, bg: np.ndarray, rgb: np.ndarray) -> tuple[float, float]:
    """Centroid weighted by coverage, estimated per pixel as the projection of (pixel - bg) on (object - bg)."""
    near = dilate(mask, 2)
    span = rgb - bg
    alpha = np.clip((frame[near] - bg) @ span / max(float(span @ span), 1e-9), 0.0, 1.0)  # (K,)
    ys, xs = np.nonzero(near)
    total = max(float(alpha.sum()), 1e-9)
    return float(alpha @ (xs + 0.5) / total), float(alpha @ (ys + 0.5) / total)


def _sharpness(frame: np.ndarray, mask: np.ndarray, bg: np.ndarray, rgb: np.ndarray) -> float:
    y = luma(frame)
    gy, gx = np.gradient(y)
    contrast = abs(float(luma(rgb) - luma(bg)))
    edge = _boundary(mask)
    return float(np.mean(np.hypot(gx, gy)[edge]) / max(contrast, 1e-9))


def detect(frame: np.ndarray) -> FrameObject | None:
    """The largest object in a (H, W, 3) uint8 frame, or None when there is none."""
    f = np.asarray(frame, float)
    bg = np.median(f.reshape(-1, 3), axis=0)  # (3,)
    fg = np.linalg.norm(f - bg, axis=-1) > THRESHOLD  # (H, W)
    labels, n = label_components(fg)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    big = sizes >= max(2, MIN_AREA_FRACTION * fg.size)
    if not big.any():
        return None
    mask = labels == 1 + int(np.argmax(sizes))
    core = mask & ~_boundary(mask)
    rgb = f[core if core.any() else mask].mean(axis=0)  # (3,) interior colour: edges are blended
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return FrameObject(
        int(big.sum()),
        tuple(bg.tolist()),
        mask,
        tuple(rgb.tolist()),
        float(fill),
        _centroid(f, mask, bg, rgb),
        _sharpness(f, mask, bg, rgb),
    )
