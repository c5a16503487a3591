"""The shapes world: procedural clips (one coloured square or disc moving straight) rendered analytically at any
size, length and frame rate, their 32 captions, and the fixed evaluation set. numpy only, no model code."""

from .clips import EVAL_SEEDS, WorldClip, evaluation_set, write_clips
from .render import RADIUS, TRAVEL, Motion, centres_px, coverage, radius_px, render_clip, render_frame, sample_motion
from .scene import BACKGROUND, CAPTION_FORMAT, COLOURS, DIRECTIONS, SHAPES, Scene, all_scenes, parse_caption

__all__ = [
    "BACKGROUND",
    "CAPTION_FORMAT",
    "COLOURS",
    "DIRECTIONS",
    "EVAL_SEEDS",
    "RADIUS",
    "SHAPES",
    "TRAVEL",
    "Motion",
    "Scene",
    "WorldClip",
    "all_scenes",
    "centres_px",
    "coverage",
    "evaluation_set",
    "parse_caption",
    "radius_px",
    "render_clip",
    "render_frame",
    "sample_motion",
    "write_clips",
]
