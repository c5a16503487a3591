"""Streaming mp4 output (H.264 through imageio-ffmpeg, yuv420p) and small readers for tests and training data.

The writer sends frames to ffmpeg as they come (nothing is buffered here), writes under a temporary name in the
destination folder and renames it over ``path`` only after a clean close *and* a check that the file holds every
frame that was sent (imageio-ffmpeg does not report ffmpeg's exit status, so a failed finalisation would
otherwise go unnoticed). On any exception the temporary file is removed and nothing appears at ``path``. With
``pending`` (an outputs.PendingOutputs) the finished file stays under its temporary name and is renamed with the
run's other outputs, all or none.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..config.video import MAX_FPS
from ..errors import InputError, RunFailure
from .outputs import partial_path


@dataclass(frozen=True)
class Mp4Info:
    """What :func:`probe_mp4` reads from a file."""

    frames: int
    """Video frames (counted from the stream's packets, not estimated from the duration)."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    fps: float
    """Frames per second as ffmpeg reports it."""


class Mp4Writer:
    """Context manager: ``with Mp4Writer(path, fps=16, width=W, height=H) as w: w.write(frames)``.

    Frames are uint8 (H, W, 3) or (N, H, W, 3) RGB. Width and height must be even (yuv420p); there is no
    resize of any kind (``macro_block_size=1``). ``crf`` and ``preset`` are libx264's; ``crf=0`` is lossless
    (libx264rgb, RGB 4:4:4, quantiser 0): reading the file back gives exactly the frames that were written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: float,
        width: int,
        height: int,
        crf: int = 18,
        preset: str = "medium",
        verify: bool = True,
        pending=None,
    ):
        self.path = Path(path)
        _check_writer_args(self.path, fps, width, height, crf)
        self.tmp = partial_path(self.path)
        self.pending = pending
        self.written: Path | None = None
        """Where the finished file lies after the block: ``path``, or the temporary name while ``pending``."""
        self.fps = Fraction(fps).limit_denominator(100000)
        self.width, self.height, self.crf, self.preset, self.verify = width, height, crf, preset, verify
        self.frames = 0
        """Frames sent to the encoder so far."""
        self._gen = None

    def __enter__(self) -> "Mp4Writer":
        import imageio_ffmpeg

        codec, pix_fmt, rate = (
            ("libx264rgb", "rgb24", ["-qp", "0"]) if self.crf == 0 else ("libx264", "yuv420p", ["-crf", str(self.crf)])
        )
        self._gen = imageio_ffmpeg.write_frames(
            str(self.tmp),
            (self.width, self.height),
            fps=self.fps,
            codec=codec,
            pix_fmt_in="rgb24",
            pix_fmt_out=pix_fmt,
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            ffmpeg_timeout=0,
            output_params=[*rate, "-preset", self.preset, "-f", "mp4"],
        )
        try:
            self._gen.send(None)  # starts ffmpeg
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, frames: np.ndarray) -> None:
        """Send uint8 frames (H, W, 3) or (N, H, W, 3) to the encoder."""
        if self._gen is None:
            raise RunFailure(f"{self.path}: write() outside the 'with Mp4Writer(...)' block")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise InputError(
                f"{self.path}: frames must be uint8 (N, {self.height}, {self.width}, 3) or "
                f"({self.height}, {self.width}, 3), got {frames.dtype} {frames.shape}"
            )
        try:
            for f in frames:
                self._gen.send(np.ascontiguousarray(f))
                self.frames += 1
        except OSError as exc:  # ffmpeg died (imageio reports a broken pipe with ffmpeg's stderr)
            raise RunFailure(write_failure_message(self.path, str(exc), exc.errno)) from exc

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._gen.close()  # ffmpeg finishes the file and exits
            self._gen = None
            if self.frames == 0:
                raise InputError(f"{self.path}: no frames were written; an empty mp4 is not a video")
            if _disk_full(self.tmp.parent):
                raise RunFailure(write_failure_message(self.path, "", errno.ENOSPC))
            if self.verify:
                found = _count_frames(self.tmp)
                if found != self.frames:
                    raise RunFailure(f"{self.path}: ffmpeg wrote {found} frames of the {self.frames} sent")
            if self.pending is None:
                self.tmp.replace(self.path)
            else:
                self.pending.add(self.tmp, self.path)
            self.written = self.path if self.pending is None else self.tmp
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Stop ffmpeg (if running) and remove the temporary file."""
        gen, self._gen = self._gen, None
        try:
            if gen is not None:
                gen.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _check_writer_args(path: Path, fps, width, height, crf) -> None:
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 2 or v % 2:
            raise InputError(f"{path}: {name}={v!r}: yuv420p needs an even integer >= 2")
    if not isinstance(fps, (int, float, Fraction)) or isinstance(fps, bool) or not 0 < fps <= MAX_FPS:
        raise InputError(f"{path}: fps={fps!r}: must be a number in (0, {MAX_FPS}]")
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise InputError(f"{path}: crf={crf!r}: libx264 takes an integer in [0, 51]")


def write_failure_message(path: Path, detail: str, err: int | None = None) -> str:
    """One line for a failed write of ``path``: 'No space left on device' (with the folder's free bytes) when
    ``err`` is ENOSPC or ffmpeg's text ``detail`` says so, else ffmpeg's last line."""
    lines = [ln.strip() for ln in str(detail).splitlines() if ln.strip()]
    if err == errno.ENOSPC or any("No space left on device" in ln for ln in lines):
        return f"{path}: No space left on device (writing in {path.parent}, {_free_bytes(path.parent)} free)"
    return f"{path}: writing failed: {lines[-1] if lines else 'ffmpeg stopped'}"


def _free_bytes(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free:,} bytes"
    except OSError:
        return "unknown bytes"


def _disk_full(folder: Path) -> bool:
    """True when the folder's file system has no free byte left (a write there was cut short)."""
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


def _count_frames(path: Path) -> int:
    """Video packets in the first video stream (stream copy, no decoding: fast even at 8K)."""
    import imageio_ffmpeg

    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-i",
        str(path),
        "-map",
        "0:v:0",
        "-c",
        "copy",
        "-f",
        "null",
        "-",
    ]
    res = subprocess.run(cmd, capture_output=True)
    text = res.stderr.decode(errors="replace")
    if res.returncode != 0:
        if _disk_full(path.parent):
            raise RunFailure(write_failure_message(path, text, errno.ENOSPC))
        raise InputError(f"{path}: ffmpeg cannot read it: {text.strip().splitlines()[-1:] or text}")
    found = re.findall(r"frame=\s*(\d+)", text)
    if not found:
        raise InputError(f"{path}: ffmpeg reported no video frames")
    return int(found[-1])


def _open_reader(path: str | os.PathLike):
    import imageio_ffmpeg

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    reader = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        reader.close()
        detail = str(e).strip().splitlines()[-1:] or [type(e).__name__]
        raise InputError(f"{p}: not a readable video ({detail[0]})") from e
    return reader, meta


def probe_mp4(path: str | os.PathLike) -> Mp4Info:
    """Frame count, size and fps of a video file."""
    reader, meta = _open_reader(path)
    reader.close()
    w, h = meta["size"]
    return Mp4Info(_count_frames(Path(path)), int(w), int(h), float(meta["fps"]))


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames as uint8 (N, H, W, 3) RGB (small videos: tests, training clips)."""
    reader, meta = _open_reader(path)
    w, h = meta["size"]
    try:
        frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]  # (H, W, 3) each
    finally:
        reader.close()
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)
