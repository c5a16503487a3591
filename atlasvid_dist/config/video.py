"""Video specification: resolution preset or WxH, frame count, fps; validated on creation.

Wan2.1 geometry (docs/method.md, geometry): frames F = 4k+1; pixel sizes multiples of 16 (VAE 8x, patch 2x). The 1080p preset
(1920x1080) is the one documented exception: it is generated at 1920x1088 and cropped when decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import check

#: name -> (width, height) of the output video.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    "480p": (832, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
    "2k": (2560, 1440),
    "4k": (3840, 2160),
    "8k": (7680, 4320),
}
#: The resolution a run has when none is given (generate and plan).
DEFAULT_RES = "720p"
#: presets allowed to pad to the next multiple of 16 and crop on decode.
PAD_AND_CROP_PRESETS = frozenset({"1080p"})
PIXELS_PER_TOKEN = 16  # VAE spatial 8x times patch 2x
VAE_TEMPORAL = 4
#: Frames per second an output may have: players and H.264 levels stop well before; 1e9 wrote a 0-second mp4.
MAX_FPS = 240
#: Most detail tokens a video may have (2**23; 8K x 241 frames is 7.9M). Checked by arithmetic before anything is
#: built: window layouts, proxy regions and latents all grow with the tokens (256x256 x 400001 frames, 25.6M
#: tokens, took 170 s and 22.4 GB in ``plan`` before it refused).
MAX_TOKENS = 8_388_608


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def parse_resolution(res: str) -> tuple[int, int, bool]:
    """``'4k'`` or ``'1920x1088'`` -> (width, height, pad_and_crop_allowed)."""
    key = str(res).strip().lower()
    if key in RESOLUTION_PRESETS:
        w, h = RESOLUTION_PRESETS[key]
        return w, h, key in PAD_AND_CROP_PRESETS
    m = re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", key)
    check(m is not None, "res", res, f"use a preset ({'|'.join(RESOLUTION_PRESETS)}) or WIDTHxHEIGHT, e.g. 1280x720")
    return int(m.group(1)), int(m.group(2)), False


@dataclass(frozen=True)
class VideoSpec:
    """What the user asked for, and the generation size derived from it."""

    width: int
    """Output width in pixels."""
    height: int
    """Output height in pixels."""
    frames: int = 81
    """Output frame count; must be 4k+1 (Wan's VAE keeps the first frame alone)."""
    fps: int = 16
    """Output frames per second."""
    pad_and_crop: bool = False
    """Allow generating at the next multiple of 16 and cropping on decode (only the 1080p preset sets it)."""
    gen_width: int = field(init=False)
    """Width actually generated (multiple of 16)."""
    gen_height: int = field(init=False)
    """Height actually generated (multiple of 16)."""

    def __post_init__(self) -> None:
        for name in ("width", "height", "frames", "fps"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, v, "must be a positive integer")
        check(self.fps <= MAX_FPS, "fps", self.fps, f"must be at most {MAX_FPS} frames per second")
        self._check_tokens()
        check(
            (self.frames - 1) % VAE_TEMPORAL == 0,
            "frames",
            self.frames,
            f"must be 4k+1 (e.g. {self._near_frames()}); Wan's VAE compresses time 4x after the first frame",
        )
        gw, gh = self.width, self.height
        if self.pad_and_crop:
            gw, gh = _round_up(gw, PIXELS_PER_TOKEN), _round_up(gh, PIXELS_PER_TOKEN)
        for name, v in (("width", gw), ("height", gh)):
            check(
                v % PIXELS_PER_TOKEN == 0,
                name,
                v,
                f"must be a multiple of {PIXELS_PER_TOKEN} (VAE 8x times patch 2x); "
                f"nearest: {v // 16 * 16 or 16} or {_round_up(v, 16)}",
            )
        object.__setattr__(self, "gen_width", gw)
        object.__setattr__(self, "gen_height", gh)

    def _check_tokens(self) -> None:
        """Refuse, from arithmetic alone, a video of more than MAX_TOKENS detail tokens (sizes rounded up)."""
        tokens = self.token_count_upper_bound()
        check(
            tokens <= MAX_TOKENS,
            "res/frames",
            f"{self.width}x{self.height} x {self.frames} frames",
            f"{tokens:,} detail tokens; at most {MAX_TOKENS:,} (e.g. 8K x 241 frames, 720P x 9,000 frames): "
            f"lower the resolution or the frame count",
        )

    def token_count_upper_bound(self) -> int:
        """Detail tokens of this size (latent frames x 16-pixel cells), sizes rounded up: pure arithmetic."""
        cells = -(-self.width // PIXELS_PER_TOKEN) * -(-self.height // PIXELS_PER_TOKEN)
        return ((self.frames - 1) // VAE_TEMPORAL + 1) * cells

    def _near_frames(self) -> str:
        lo = (self.frames - 1) // 4 * 4 + 1
        return f"{lo} or {lo + 4}"

    @classmethod
    def from_res(cls, res: str, frames: int = 81, fps: int = 16) -> "VideoSpec":
        w, h, pad = parse_resolution(res)
        return cls(width=w, height=h, frames=frames, fps=fps, pad_and_crop=pad)

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TEMPORAL + 1

    @property
    def cropped(self) -> bool:
        """True when the generated size differs from the output size (pad-and-crop)."""
        return (self.gen_width, self.gen_height) != (self.width, self.height)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps
