"""Clips of the shapes world on disk (mp4 + captions.jsonl, the training-data layout) and the fixed evaluation set."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import check
from .render import Motion, render_clip, sample_motion
from .scene import Scene, all_scenes

EVAL_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Seeds of the fixed evaluation set (each caption once per seed)."""


@dataclass(frozen=True)
class WorldClip:
    """One clip of the world: a scene and the seed that places it."""

    scene: Scene
    """What the clip shows (its caption)."""
    seed: int
    """Seed of the start position (with the scene's index, so each caption gets its own start)."""

    def motion(self, width: int, height: int) -> Motion:
        """The start and travel (normalised: the same scene at every size of this aspect ratio)."""
        index = all_scenes().index(self.scene)
        return sample_motion(self.scene, width, height, np.random.default_rng([self.seed, index]))

    def render(self, width: int, height: int, frames: int) -> np.ndarray:
        """(N, H, W, 3) uint8 ground-truth frames at this size."""
        return render_clip(self.scene, self.motion(width, height), width, height, frames)


def evaluation_set(seeds: tuple[int, ...] = EVAL_SEEDS) -> tuple[WorldClip, ...]:
    """All 32 captions x ``seeds``, in a fixed order (seed-major)."""
    return tuple(WorldClip(scene, seed) for seed in seeds for scene in all_scenes())


def write_clips(
    folder: str | os.PathLike,
    clips: list[tuple[Scene, Motion]],
    *,
    frames: int,
    width: int,
    height: int,
    fps: float,
    crf: int = 10,
) -> Path:
    """Write ``video_{i:03d}.mp4`` for each (scene, motion) and ``captions.jsonl`` into ``folder``; returns it."""
    from ..pipeline.video_io import Mp4Writer

    check(isinstance(frames, int) and frames >= 1, "frames", frames, "must be an integer >= 1")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, motion) in enumerate(clips):
        name = f"video_{i:03d}.mp4"
        with Mp4Writer(out / name, fps=fps, width=width, height=height, crf=crf, preset="ultrafast") as w:
            w.write(render_clip(scene, motion, width, height, frames))
        lines.append(json.dumps({"video": name, "caption": scene.caption}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return out
