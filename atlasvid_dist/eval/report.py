"""Reporting scores: a summary, a terminal table, JSON, and a PNG grid of frames (rows: videos, columns: frames).

JSON numbers that are not finite are written as strings ("inf" for identical frames' PSNR, "nan" where a metric
has no value: no object found), so the file is strict JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..world import parse_caption
from .score import VideoScore

GRID_COLUMNS = 6
"""Frames shown per video in the grid (evenly spaced, first and last included)."""


@dataclass(frozen=True)
class Summary:
    """Scores over a set of videos."""

    videos: int
    """Videos scored."""
    all_correct: float
    """Fraction of videos with one object in every frame and colour, shape and direction right."""
    one_object: float
    """Fraction with exactly one object in every frame."""
    colour: float
    """Fraction whose detected colour is the caption's."""
    shape: float
    """Fraction whose detected shape is the caption's."""
    direction: float
    """Fraction whose detected direction is the caption's."""
    mean_psnr: float
    """Mean PSNR (dB) over videos with a finite one (identical videos are left out; nan: none)."""
    identical: int
    """Videos identical to their re-render (infinite PSNR)."""
    mean_ssim: float
    """Mean SSIM over videos where it was computed."""
    mean_path_rms_px: float
    """Mean path RMS (pixels) over videos where it was computed."""


def _mean(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _fraction(scores: list[VideoScore], right) -> float:
    return sum(bool(right(s)) for s in scores) / max(len(scores), 1)


def summarise(scores: list[VideoScore]) -> Summary:
    n = len(scores)
    scenes = [parse_caption(s.caption) for s in scores]
    found = list(zip(scores, scenes))
    return Summary(
        n,
        _fraction(scores, lambda s: s.all_correct),
        _fraction(scores, lambda s: s.one_object),
        sum(s.colour == c.colour for s, c in found) / max(n, 1),
        sum(s.shape == c.shape for s, c in found) / max(n, 1),
        sum(s.direction == c.direction for s, c in found) / max(n, 1),
        _mean(s.psnr for s in scores),
        sum(s.psnr == float("inf") for s in scores),
        _mean(s.ssim for s in scores),
        _mean(s.path_rms_px for s in scores),
    )


def _fmt(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def format_table(scores: list[VideoScore]) -> str:
    """One line per video and a summary line, for the terminal."""
    head = (
        f"{'video':<18} {'caption':<28} {'ok':<3} {'found':<24} {'objs':<5} {'rms px':>7} {'psnr':>6} "
        f"{'ssim':>6} {'bg flk':>6} {'sharp':>5}"
    )
    rows = [head]
    for s in scores:
        found = f"{s.colour} {s.shape} {s.direction}" if s.colour else "nothing"
        objs = "1" if s.one_object else f"{min(s.objects_per_frame)}-{max(s.objects_per_frame)}"
        rows.append(
            f"{s.name[-18:]:<18} {s.caption[:28]:<28} {'yes' if s.all_correct else 'no':<3} "
            f"{found[:24]:<24} {objs:<5} {_fmt(s.path_rms_px):>7} {_fmt(s.psnr, 1):>6} "
            f"{_fmt(s.ssim, 3):>6} {_fmt(s.background_flicker):>6} {_fmt(s.edge_sharpness):>5}"
        )
    m = summarise(scores)
    rows.append(
        f"{m.videos} videos: {m.all_correct:.0%} all-correct (one object {m.one_object:.0%}, colour {m.colour:.0%}, "
        f"shape {m.shape:.0%}, direction {m.direction:.0%}), PSNR {_fmt(m.mean_psnr, 1)} dB "
        f"(+{m.identical} identical), SSIM {_fmt(m.mean_ssim, 3)}, path RMS {_fmt(m.mean_path_rms_px)} px"
    )
    return "\n".join(rows)


def jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def to_json(scores: list[VideoScore]) -> str:
    """{"summary": {...}, "videos": [{...}, ...]} as strict JSON."""
    doc = {"summary": asdict(summarise(scores)), "videos": [asdict(s) for s in scores]}
    return json.dumps(jsonable(doc), indent=1, allow_nan=False)


def frame_grid(rows: list[np.ndarray], columns: int = GRID_COLUMNS, gap: int = 2) -> np.ndarray:
    """(R * (H + gap), C * (W + gap), 3) uint8 picture: one row per video, ``columns`` evenly spaced frames each,
    every cell padded to the largest frame size (grey gaps)."""
    h = max(v.shape[1] for v in rows)
    w = max(v.shape[2] for v in rows)
    grid = np.full((len(rows) * (h + gap), columns * (w + gap), 3), 128, np.uint8)
    for r, video in enumerate(rows):
        picks = np.unique(np.linspace(0, len(video) - 1, columns).round().astype(int))
        for c, f in enumerate(picks):
            fh, fw = video.shape[1:3]
            grid[r * (h + gap) : r * (h + gap) + fh, c * (w + gap) : c * (w + gap) + fw] = video[f]
    return grid


def write_grid(path: str | Path, rows: list[np.ndarray]) -> Path:
    """Write :func:`frame_grid` of ``rows`` as a PNG (imageio); a ConfigError names a destination that fails."""
    import imageio.v3 as iio

    out = Path(path)
    if out.suffix.lower() != ".png" or not out.parent.is_dir():
        raise ConfigError("grid", str(path), "must be a .png in an existing folder")
    try:
        iio.imwrite(out, frame_grid(rows))
    except OSError as exc:
        raise ConfigError("grid", str(path), f"cannot be written ({exc.strerror or exc})") from None
    return out
