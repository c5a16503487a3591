"""A tiny synthetic training set: coloured shapes moving on a plain background, written as mp4 + captions.jsonl.

A thin wrapper over the shapes world (atlasvid_dist.world): each video is one shape (square or disc) of one colour
moving straight in one direction, fully inside the frame; the caption says which ("a red square moving right"),
so a LoRA has something learnable to fit. Deterministic from ``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import check
from ..world import COLOURS, DIRECTIONS, SHAPES, Scene, sample_motion, write_clips


def _scene(i: int) -> Scene:
    """Video i's scene: colours and shapes cycle, directions shift every len(COLOURS) videos."""
    return Scene(
        list(COLOURS)[i % len(COLOURS)],
        SHAPES[i % len(SHAPES)],
        list(DIRECTIONS)[(i // len(COLOURS) + i) % len(DIRECTIONS)],
    )


def write_synthetic_dataset(
    folder: str | os.PathLike,
    *,
    num_videos: int = 4,
    frames: int = 17,
    width: int = 64,
    height: int = 64,
    fps: float = 16.0,
    seed: int = 0,
) -> Path:
    """Write ``num_videos`` moving-shape mp4s (``video_{i:03d}.mp4``) and ``captions.jsonl`` into ``folder``;
    returns the folder."""
    check(isinstance(num_videos, int) and num_videos >= 1, "num_videos", num_videos, "must be an integer >= 1")
    check(isinstance(frames, int) and frames >= 1, "frames", frames, "must be an integer >= 1")
    rng = np.random.default_rng(seed)
    scenes = [_scene(i) for i in range(num_videos)]
    clips = [(s, sample_motion(s, width, height, rng)) for s in scenes]
    return write_clips(folder, clips, frames=frames, width=width, height=height, fps=fps, crf=10)
