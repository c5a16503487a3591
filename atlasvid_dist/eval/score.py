"""Scoring one video against its caption: detection per frame, colour/shape/direction, path, flicker, sharpness,
and MSE/PSNR/SSIM against an analytic re-render of the caption at the detected start and speed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..world import Scene, parse_caption, render_frame
from .detect import SQUARE_FILL, FrameObject, detect, dilate, nearest_colour
from .metrics import PathFit, fit_path, luma, mse, psnr, ssim


@dataclass(frozen=True)
class VideoScore:
    """What the evaluator found in one video and how it compares with its caption."""

    name: str
    """The video's file name (or a label for an array)."""
    caption: str
    """The caption the video should depict."""
    width: int
    """Frame width in pixels (metrics are at this, the output, size)."""
    height: int
    """Frame height in pixels."""
    frames: int
    """Frames scored."""
    objects_per_frame: tuple[int, ...]
    """Objects detected in each frame."""
    one_object: bool
    """Exactly one object in every frame."""
    colour: str | None
    """Detected colour (nearest world colour to the object's mean RGB over the frames); None: no object."""
    shape: str | None
    """Detected shape (median bounding-box fill ratio: square ~1, disc ~pi/4)."""
    direction: str | None
    """Detected direction (axis and sign of the fitted velocity); None with fewer than 2 detections."""
    all_correct: bool
    """One object in every frame and colour, shape and direction as captioned."""
    fill_ratio: float
    """Median fill ratio of the object's bounding box."""
    speed_px: float
    """Fitted speed in pixels per frame."""
    path_rms_px: float
    """RMS distance (pixels) of the centroids from the least-squares constant-speed line."""
    background_flicker: float
    """Mean absolute frame-to-frame change (8-bit) of pixels far from the object in both frames."""
    object_flicker: float
    """Mean absolute frame-to-frame change of the object's mean luma (8-bit)."""
    edge_sharpness: float
    """Mean over frames of the object's boundary gradient / contrast (about 1: a one-pixel edge)."""
    mse: float
    """MSE (8-bit) against the re-render of the caption at the detected start and speed; nan: no path."""
    psnr: float
    """PSNR in dB of that MSE (inf: identical)."""
    ssim: float
    """Mean SSIM (luma, gaussian 11x11) against the re-render."""


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(f"{name}: frames must be uint8 (N, H, W, 3) with N >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _direction(fit: PathFit | None) -> str | None:
    if fit is None:
        return None
    vx, vy = fit.velocity
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _mean_or_nan(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def _flicker(frames: np.ndarray, found: list[FrameObject | None]) -> tuple[float, float]:
    """(background, object) mean absolute change between consecutive frames."""
    bg_diffs, obj_diffs = [], []
    for t in range(len(frames) - 1):
        a, b = found[t], found[t + 1]
        away = np.ones(frames.shape[1:3], bool)
        for o in (a, b):
            if o is not None:
                away &= ~dilate(o.mask, 2)
        if away.any():
            bg_diffs.append(np.abs(frames[t + 1].astype(float) - frames[t])[away].mean())
        if a is not None and b is not None:
            obj_diffs.append(abs(float(luma(np.array(b.rgb)) - luma(np.array(a.rgb)))))
    return _mean_or_nan(bg_diffs), _mean_or_nan(obj_diffs)


def _compare(frames: np.ndarray, scene: Scene, fit: PathFit | None) -> tuple[float, float, float]:
    """(MSE, PSNR, SSIM) against the caption re-rendered at the fitted start, moving at the fitted speed along the
    caption's direction."""
    if fit is None:
        return float("nan"), float("nan"), float("nan")
    speed = float(np.hypot(*fit.velocity))
    step = np.array(scene.step, float)
    errs, sims = [], []
    for f, frame in enumerate(frames):
        ref = render_frame(scene, tuple(np.array(fit.start) + f * speed * step), frame.shape[1], frame.shape[0])
        errs.append(mse(frame, ref))
        sims.append(ssim(frame, ref))
    err = float(np.mean(errs))
    return err, psnr(err), float(np.mean(sims))


def score_video(frames: np.ndarray, caption: str, name: str = "array") -> VideoScore:
    """Score (N, H, W, 3) uint8 frames against ``caption`` (an InputError names a caption that does not parse)."""
    scene = parse_caption(caption)
    frames = _check_frames(frames, name)
    found = [detect(f) for f in frames]
    seen = [(t, o) for t, o in enumerate(found) if o is not None]
    counts = tuple(0 if o is None else o.count for o in found)
    fit = fit_path(np.array([t for t, _ in seen]), np.array([o.centre for _, o in seen]).reshape(-1, 2))
    colour = nearest_colour(np.mean([o.rgb for _, o in seen], axis=0)) if seen else None
    fill = float(np.median([o.fill for _, o in seen])) if seen else float("nan")
    shape = None if not seen else "square" if fill > SQUARE_FILL else "disc"
    direction = _direction(fit)
    one = all(c == 1 for c in counts)
    correct = one and (colour, shape, direction) == (scene.colour, scene.shape, scene.direction)
    bg_flicker, obj_flicker = _flicker(frames, found)
    err, db, sim = _compare(frames, scene, fit)
    return VideoScore(
        name,
        caption,
        frames.shape[2],
        frames.shape[1],
        frames.shape[0],
        counts,
        one,
        colour,
        shape,
        direction,
        correct,
        fill,
        float(np.hypot(*fit.velocity)) if fit else float("nan"),
        fit.rms_px if fit else float("nan"),
        bg_flicker,
        obj_flicker,
        float(np.mean([o.sharpness for _, o in seen])) if seen else float("nan"),
        err,
        db,
        sim,
    )
