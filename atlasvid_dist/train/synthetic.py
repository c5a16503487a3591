"""A tiny synthetic training set: coloured shapes moving on a plain background, written as mp4 + captions.jsonl.

Each video is one shape (square or disc) of one colour crossing the frame in one direction; the caption says
which ("a red square moving right"), so a LoRA has something learnable to fit. Deterministic from ``seed``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import check
from ..pipeline.video_io import Mp4Writer

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
SHAPES = ("square", "disc")


def _frame(size: tuple[int, int], centre: tuple[float, float], radius: int, shape: str, colour) -> np.ndarray:
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]  # (H, W) each
    dx, dy = xs - centre[0], ys - centre[1]
    inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius) if shape == "square" else dx**2 + dy**2 <= radius**2
    img = np.full((h, w, 3), 30, np.uint8)
    img[inside] = colour
    return img


def write_synthetic_dataset(folder: str | os.PathLike, *, num_videos: int = 4, frames: int = 17,
                            width: int = 64, height: int = 64, fps: float = 16.0, seed: int = 0) -> Path:
    """Write ``num_videos`` moving-shape mp4s and ``captions.jsonl`` into ``folder``; returns the folder."""
    check(isinstance(num_videos, int) and num_videos >= 1, "num_videos", num_videos, "must be an integer >= 1")
    check(isinstance(frames, int) and frames >= 1, "frames", frames, "must be an integer >= 1")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_videos):
        colour = list(COLOURS)[i % len(COLOURS)]
        direction = list(DIRECTIONS)[(i // len(COLOURS) + i) % len(DIRECTIONS)]
        shape = SHAPES[i % len(SHAPES)]
        radius = max(2, min(width, height) // 8)
        start = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
        step = np.array(DIRECTIONS[direction], float) * max(1.0, width / (2 * frames))
        name = f"video_{i:03d}.mp4"
        with Mp4Writer(out / name, fps=fps, width=width, height=height, crf=10, preset="ultrafast") as w:
            for f in range(frames):
                c = start + f * step
                c = np.array([c[0] % width, c[1] % height])  # wrap around the frame edges
                w.write(_frame((width, height), (float(c[0]), float(c[1])), radius, shape, COLOURS[colour]))
        lines.append(json.dumps({"video": name, "caption": f"a {colour} {shape} moving {direction}"}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out
