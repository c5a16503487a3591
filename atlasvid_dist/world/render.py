"""Analytic rendering of a Scene at any size and length: exact per-pixel area coverage, so ground truth exists at
every resolution.

Coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1) in pixels; a normalised position (x, y) in [0, 1]
is (x * W, y * H) in pixels. The object's radius (half-side of the square) is RADIUS of the frame's short side;
over the clip its centre moves ``travel`` of the frame's length along its direction, linearly in the frame index
(frame f of N at t = f / (N - 1)), so the frame rate only labels the file and never changes a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, check
from .scene import BACKGROUND, COLOURS, Scene

RADIUS = 1 / 6
"""Object radius (disc) or half-side (square) as a fraction of the frame's short side."""
TRAVEL = 0.5
"""Default distance the centre moves over a clip, as a fraction of the frame's length along the motion."""


@dataclass(frozen=True)
class Motion:
    """Where the object is over a clip, in normalised coordinates (the same scene at every resolution)."""

    start: tuple[float, float]
    """Centre (x, y) in the first frame, as fractions of the frame's width and height."""
    travel: float
    """Distance moved between the first and last frame along the scene's direction, as a fraction of the frame's
    width (left/right) or height (up/down)."""


def radius_px(width: int, height: int) -> float:
    """Object radius in pixels at this size."""
    return RADIUS * min(width, height)


def frame_times(frames: int) -> np.ndarray:
    """(N,) position of each frame in the clip, 0 at the first and 1 at the last."""
    return np.arange(frames) / max(frames - 1, 1)


def centres_px(scene: Scene, motion: Motion, width: int, height: int, frames: int) -> np.ndarray:
    """(N, 2) object centre (x, y) in pixels in each frame."""
    step = np.array(scene.step, float) * motion.travel  # (2,) normalised displacement over the clip
    norm = np.asarray(motion.start, float) + frame_times(frames)[:, None] * step  # (N, 2)
    return norm * np.array([width, height], float)


def sample_motion(scene: Scene, width: int, height: int, rng: np.random.Generator, travel: float = TRAVEL) -> Motion:
    """A start drawn from ``rng`` such that the whole object stays inside the frame for the whole clip."""
    r = radius_px(width, height) / np.array([width, height], float)  # (2,) normalised radius in x and y
    step = np.array(scene.step)
    axis = int(np.argmax(np.abs(step)))
    check(
        0 <= travel <= 1 - 2 * r[axis],
        "travel",
        travel,
        f"must be in [0, {1 - 2 * r[axis]:.4g}] so the object stays inside a {width}x{height} frame",
    )
    lo, hi = r.copy(), 1 - r  # (2,) bounds of the start in x and y
    if step[axis] > 0:
        hi[axis] -= travel
    else:
        lo[axis] += travel
    start = lo + rng.random(2) * (hi - lo)
    return Motion((float(start[0]), float(start[1])), float(travel))


def _square_coverage(cx: float, cy: float, r: float, width: int, height: int) -> np.ndarray:
    """(H, W) exact area of [cx-r, cx+r] x [cy-r, cy+r] inside each pixel (separable)."""

    def overlap(n: int, c: float) -> np.ndarray:
        edges = np.arange(n, dtype=float)
        return np.clip(np.minimum(edges + 1, c + r) - np.maximum(edges, c - r), 0.0, 1.0)

    return overlap(height, cy)[:, None] * overlap(width, cx)[None, :]


def _half_chord_integral(x: np.ndarray, r: float) -> np.ndarray:
    """Integral of sqrt(r^2 - u^2) du from -r to x (x clipped to [-r, r])."""
    x = np.clip(x, -r, r)
    return 0.5 * (x * np.sqrt(np.maximum(r * r - x * x, 0.0)) + r * r * np.arcsin(x / r)) + 0.25 * np.pi * r * r


def _clipped_integral(x0: np.ndarray, x1: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Integral over x in [x0, x1] of clip(y, -h(x), h(x)), h(x) = sqrt(r^2 - x^2) (0 outside the disc).

    Where |x| <= w = sqrt(r^2 - y^2) the clip is y itself; elsewhere it is sign(y) h(x)."""
    w = np.sqrt(np.maximum(r * r - y * y, 0.0))

    def h_int(a, b):
        return np.where(b > a, _half_chord_integral(b, r) - _half_chord_integral(a, r), 0.0)

    inner = np.clip(np.minimum(x1, w) - np.maximum(x0, -w), 0.0, None)
    outer = h_int(x0, np.minimum(x1, -w)) + h_int(np.maximum(x0, w), x1)
    return y * inner + np.sign(y) * outer


def _disc_coverage(cx: float, cy: float, r: float, width: int, height: int) -> np.ndarray:
    """(H, W) exact area of the disc inside each pixel: the integral over each column of the length of
    [row top, row bottom] inside the disc, in closed form."""
    x0 = np.arange(width, dtype=float)[None, :] - cx  # (1, W) left edge of each column, relative to the centre
    y = np.arange(height + 1, dtype=float)[:, None] - cy  # (H+1, 1) row edges, relative to the centre
    below = _clipped_integral(x0, x0 + 1, y, r)  # (H+1, W)
    return np.clip(below[1:] - below[:-1], 0.0, 1.0)


def frame_coverage(shape: str, centre: tuple[float, float], width: int, height: int) -> np.ndarray:
    """(H, W) fraction of each pixel covered by a ``shape`` centred at ``centre`` (pixels), exact up to float
    rounding; the object may lie partly or wholly outside the frame."""
    draw = _square_coverage if shape == "square" else _disc_coverage
    return draw(float(centre[0]), float(centre[1]), radius_px(width, height), width, height)


def coverage(scene: Scene, motion: Motion, width: int, height: int, frames: int) -> np.ndarray:
    """(N, H, W) fraction of each pixel covered by the object in each frame."""
    _check_size(width, height, frames)
    return np.stack(
        [frame_coverage(scene.shape, c, width, height) for c in centres_px(scene, motion, width, height, frames)]
    )


def render_frame(scene: Scene, centre: tuple[float, float], width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: background blended with the object's colour by exact coverage."""
    cov = frame_coverage(scene.shape, centre, width, height)[..., None]  # (H, W, 1)
    bg, fg = np.array(BACKGROUND, float), np.array(COLOURS[scene.colour], float)
    return np.rint(bg + cov * (fg - bg)).astype(np.uint8)


def render_clip(scene: Scene, motion: Motion, width: int, height: int, frames: int) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB ground-truth frames."""
    _check_size(width, height, frames)
    return np.stack([render_frame(scene, c, width, height) for c in centres_px(scene, motion, width, height, frames)])


def _check_size(width, height, frames) -> None:
    for name, v in (("width", width), ("height", height), ("frames", frames)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(name, v, "must be an integer >= 1")
