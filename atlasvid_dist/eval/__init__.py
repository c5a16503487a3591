"""The shapes-world evaluator: how faithfully a video depicts its caption, at the video's own size.

Per video: objects per frame, colour, shape and direction (all-correct when one object in every frame and all
three match the caption), path straightness and steadiness, flicker, edge sharpness, and MSE/PSNR/SSIM against an
analytic re-render of the caption at the detected start and speed. numpy only.
"""

from ..world import EVAL_SEEDS, WorldClip, evaluation_set
from .components import label_components
from .detect import FrameObject, detect, nearest_colour
from .metrics import PathFit, fit_path, mse, psnr, ssim
from .report import Summary, format_table, frame_grid, summarise, to_json, write_grid
from .score import VideoScore, score_video

__all__ = [
    "EVAL_SEEDS",
    "FrameObject",
    "PathFit",
    "Summary",
    "VideoScore",
    "WorldClip",
    "detect",
    "evaluation_set",
    "fit_path",
    "format_table",
    "frame_grid",
    "label_components",
    "mse",
    "nearest_colour",
    "psnr",
    "score_video",
    "ssim",
    "summarise",
    "to_json",
    "write_grid",
]
