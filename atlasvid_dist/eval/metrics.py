"""Image and path metrics in numpy: MSE/PSNR, SSIM, luma, a least-squares constant-speed fit of a path.

SSIM follows Wang et al. 2004 on luma (BT.601 Y' from 8-bit RGB, range 255): an 11x11 gaussian window with
sigma 1.5, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, over the 'valid' region (windows wholly inside the frame),
averaged over the frame. Frames must be at least 11 pixels on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
LUMA = np.array([0.299, 0.587, 0.114])
"""BT.601 luma weights of R, G, B."""


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., H, W) luma of (..., H, W, 3) RGB, float."""
    return np.asarray(rgb, float) @ LUMA


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every pixel and channel (8-bit scale)."""
    return float(np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))


def psnr(err: float) -> float:
    """PSNR in dB of an 8-bit MSE; inf when the images are identical."""
    return float("inf") if err == 0 else float(10 * np.log10(255.0**2 / err))


def _gaussian() -> np.ndarray:
    x = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur(img: np.ndarray) -> np.ndarray:
    """(H-10, W-10) separable gaussian filter of (H, W), valid region only."""
    g, n = _gaussian(), SSIM_WINDOW
    h, w = img.shape
    rows = sum(g[k] * img[k : h - n + 1 + k, :] for k in range(n))  # (H-10, W)
    return sum(g[k] * rows[:, k : w - n + 1 + k] for k in range(n))  # (H-10, W-10)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (H, W, 3) 8-bit RGB frames, on luma (see the module docstring)."""
    x, y = luma(a), luma(b)
    if min(x.shape) < SSIM_WINDOW:
        raise InputError(f"frame {x.shape[1]}x{x.shape[0]}: SSIM needs at least {SSIM_WINDOW} pixels a side")
    mx, my = _blur(x), _blur(y)
    vx, vy, cxy = _blur(x * x) - mx * mx, _blur(y * y) - my * my, _blur(x * y) - mx * my
    num = (2 * mx * my + C1) * (2 * cxy + C2)
    den = (mx * mx + my * my + C1) * (vx + vy + C2)
    return float(np.mean(num / den))


@dataclass(frozen=True)
class PathFit:
    """A least-squares constant-speed line through an object's centroids, c(f) = start + f * velocity."""

    start: tuple[float, float]
    """Fitted centre (x, y) in pixels at frame 0."""
    velocity: tuple[float, float]
    """Fitted displacement (x, y) in pixels per frame."""
    rms_px: float
    """RMS distance in pixels of the centroids from the fitted line (0: perfectly straight and steady)."""


def fit_path(frame_index: np.ndarray, centres: np.ndarray) -> PathFit | None:
    """Fit (K,) frame indices and (K, 2) centroids; None with fewer than 2 points."""
    if len(frame_index) < 2:
        return None
    a = np.stack([np.ones(len(frame_index)), np.asarray(frame_index, float)], axis=1)  # (K, 2)
    coef, *_ = np.linalg.lstsq(a, centres, rcond=None)  # (2, 2): rows start, velocity; columns x, y
    resid = centres - a @ coef  # (K, 2)
    rms = float(np.sqrt(np.mean(np.sum(resid**2, axis=1))))
    return PathFit((float(coef[0, 0]), float(coef[0, 1])), (float(coef[1, 0]), float(coef[1, 1])), rms)
