"""`atlasvid-dist eval`: score videos of the shapes world against their captions (detection, colour, shape,
direction, path, flicker, sharpness, MSE/PSNR/SSIM against an analytic re-render) and print a table; optionally
write JSON and a PNG grid of frames."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError


def _check_out(field: str, path: Optional[str], suffix: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() != suffix or not p.parent.resolve().is_dir() or p.is_dir():
        raise ConfigError(field, path, f"must be a {suffix} file in an existing folder")


def _inputs(videos: Optional[str], video: Optional[str], caption: Optional[str]) -> list[tuple[Path, str]]:
    from ..eval.inputs import read_captions
    from ..world import parse_caption

    if (videos is None) == (video is None):
        raise ConfigError("videos", videos, "give either --videos DIR or --video FILE --caption TEXT")
    if videos is not None:
        if caption is not None:
            raise ConfigError("caption", caption, "goes with --video; --videos reads DIR/captions.jsonl")
        return read_captions(videos)
    if caption is None:
        raise ConfigError("caption", caption, "--video needs --caption TEXT")
    parse_caption(caption)
    return [(Path(video), caption)]


def evaluate(
    videos: Optional[str] = typer.Option(None, "--videos", help="Folder with videos and captions.jsonl."),
    video: Optional[str] = typer.Option(None, "--video", help="One mp4 (with --caption)."),
    caption: Optional[str] = typer.Option(
        None, "--caption", help="What --video should show, e.g. 'a red square moving right'."
    ),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the scores to this JSON file."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Write a PNG grid of frames (row per video)."),
) -> None:
    """Score shapes-world videos against their captions."""
    from ..eval import format_table, score_video, to_json, write_grid
    from ..pipeline.video_io import read_mp4

    _check_out("json", json_out, ".json")
    _check_out("grid", grid, ".png")
    items = _inputs(videos, video, caption)
    scores, rows = [], []
    for path, text in items:
        frames = read_mp4(path)
        scores.append(score_video(frames, text, name=path.name))
        if grid:
            rows.append(frames)
    typer.echo(format_table(scores))
    if json_out:
        Path(json_out).write_text(to_json(scores) + "\n")
    if grid:
        write_grid(grid, rows)
