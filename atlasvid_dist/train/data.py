"""Training data: a folder of videos + ``captions.jsonl``, cut into clips of 4k+1 frames, encoded to Wan latents.

Layout: ``DIR/captions.jsonl`` holds one JSON object a line, ``{"video": "relative/path.mp4", "caption": "..."}``.

Clips (docs/method.md): the detail clip is ``frames`` frames at ``fps`` and ``width x height``; its proxy is the same
clip reduced in time by r_t (every r_t-th detail frame) and in space by ``spatial_scale``, with
``ProxyGeometry``'s frame count (one more latent frame when (f-1) is not a multiple of r_t, so the proxy spans
a little past the clip, as at generation). Stage 1 trains on the proxy clip alone (fps / r_t); stage 2 on the
pair. Clip choice is a pure function of (seed, step, rank), so a resumed run sees exactly the same data.

Bad data (unreadable video, too few frames, missing caption or file) is reported as ``InputError`` naming the
file and the reason; with ``bad_data='skip'`` the entry is dropped and counted instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..pipeline.text import encode_text
from ..pipeline.video_io import probe_mp4, read_mp4
from .config import TrainConfig

CAPTIONS = "captions.jsonl"
VAE_TEMPORAL = 4
"""Pixel frames per latent frame of the Wan VAE (after the first)."""


@dataclass(frozen=True)
class VideoRecord:
    """One usable training video."""

    path: Path
    """The video file."""
    caption: str
    """Its caption."""
    fps: float
    """Its frame rate."""
    frames: int
    """Its frame count."""


@dataclass(frozen=True)
class Dataset:
    """The usable videos of a folder and what was skipped (file, reason)."""

    records: tuple[VideoRecord, ...]
    """Videos that passed every check."""
    skipped: tuple[tuple[str, str], ...]
    """(file, reason) of each entry dropped under bad_data='skip'."""


# --- clip geometry ------------------------------------------------------------------------------------------


def proxy_pixel_frames(cfg: TrainConfig) -> int:
    """Pixel frames of the proxy clip: (f_p - 1) * 4 + 1 with f_p = ceil((f - 1) / r_t) + 1 latent frames."""
    f = (cfg.frames - 1) // VAE_TEMPORAL + 1
    f_p = math.ceil((f - 1) / cfg.temporal_scale) + 1
    return (f_p - 1) * VAE_TEMPORAL + 1


def source_stride(cfg: TrainConfig, source_fps: float) -> int:
    """Source frames per detail frame (1 when the video's fps is at most the training fps)."""
    return max(1, round(source_fps / cfg.fps))


def needed_source_frames(cfg: TrainConfig, source_fps: float) -> int:
    """Source frames one clip spans: the detail clip and its proxy (which may reach a little past it)."""
    span = max(cfg.frames, (proxy_pixel_frames(cfg) - 1) * cfg.temporal_scale + 1)  # at detail rate
    return (span - 1) * source_stride(cfg, source_fps) + 1


# --- scanning -----------------------------------------------------------------------------------------------


def _bad(policy: str, skipped: list, file: str, reason: str) -> None:
    if policy == "stop":
        raise InputError(f"{file}: {reason}")
    skipped.append((file, reason))


def _parse_line(line: str, file: Path, n: int) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {n} is not JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("video"), str) or not obj["video"]:
        raise ValueError(f"line {n} has no 'video' path")
    caption = obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"missing caption (line {n} of {file.name})")
    return obj["video"], caption


def scan_dataset(folder: str | Path, cfg: TrainConfig) -> Dataset:
    """Read captions.jsonl and probe every video; bad entries raise or are skipped by ``cfg.bad_data``."""
    root = Path(folder)
    captions = root / CAPTIONS
    if not root.is_dir():
        raise InputError(f"{root}: data folder does not exist")
    if not captions.is_file():
        raise InputError(f"{captions}: no captions file (the data folder needs {CAPTIONS})")
    lines = [(n, ln) for n, ln in enumerate(captions.read_text().splitlines(), 1) if ln.strip()]
    if not lines:
        raise InputError(f"{captions}: empty dataset (no entries)")
    records, skipped = [], []
    for n, line in lines:
        try:
            rel, caption = _parse_line(line, captions, n)
        except ValueError as e:
            _bad(cfg.bad_data, skipped, str(captions), str(e))
            continue
        record = _probe(root / rel, caption, cfg, skipped)
        if record is not None:
            records.append(record)
    if not records:
        raise InputError(
            f"{root}: no usable videos ({len(skipped)} skipped: {'; '.join(f'{f}: {r}' for f, r in skipped[:3])})"
        )
    return Dataset(tuple(records), tuple(skipped))


def _probe(path: Path, caption: str, cfg: TrainConfig, skipped: list) -> VideoRecord | None:
    if not path.is_file():
        _bad(cfg.bad_data, skipped, str(path), "video file not found")
        return None
    try:
        info = probe_mp4(path)
    except InputError as e:
        _bad(cfg.bad_data, skipped, str(path), f"unreadable video ({e})")
        return None
    need = needed_source_frames(cfg, info.fps)
    if info.frames < need:
        _bad(
            cfg.bad_data,
            skipped,
            str(path),
            f"too few frames: {info.frames}, a clip needs {need} "
            f"(frames={cfg.frames} at fps={cfg.fps:g}, temporal_scale={cfg.temporal_scale}: lower --frames or "
            f"--fps, or set temporal_scale in --config)",
        )
        return None
    return VideoRecord(path, caption, info.fps, info.frames)


# --- clips --------------------------------------------------------------------------------------------------


def resize_crop(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (3, N, height, width) in [-1, 1]: scale to cover, then centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # (3, N, H, W)


@dataclass
class Clip:
    """One training example in pixels: detail (stage 2 only) and proxy, each (3, N, H, W) in [-1, 1]."""

    caption: str
    proxy: torch.Tensor
    detail: torch.Tensor | None


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The RNG of one (step, rank): clip choice and noise depend on nothing else, so resume is exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def sample_clip(data: Dataset, cfg: TrainConfig, gen: torch.Generator) -> Clip:
    """Pick a video and a start frame with ``gen``; cut and resize the proxy (and for stage 2 the detail) clip."""
    rec = data.records[int(torch.randint(len(data.records), (1,), generator=gen))]
    need = needed_source_frames(cfg, rec.fps)
    start = int(torch.randint(rec.frames - need + 1, (1,), generator=gen))
    return cut_clip(rec, start, cfg)


def clip_starts(rec: VideoRecord, cfg: TrainConfig, count: int) -> list[int]:
    """``count`` start frames spread evenly over the video (the first and the last possible one included)."""
    last = rec.frames - needed_source_frames(cfg, rec.fps)
    if count == 1:
        return [last // 2]
    return sorted({round(k * last / (count - 1)) for k in range(count)})


def cut_clip(rec: VideoRecord, start: int, cfg: TrainConfig) -> Clip:
    """The clip of ``rec`` starting at source frame ``start``: proxy (and for stage 2 detail) pixels."""
    stride = source_stride(cfg, rec.fps)
    need = needed_source_frames(cfg, rec.fps)
    frames = read_mp4(rec.path)
    if len(frames) < start + need:  # probe and decode disagree (damaged tail)
        raise InputError(f"{rec.path}: decoded {len(frames)} frames, a clip at {start} needs {start + need}")
    seq = frames[start : start + need : stride]  # at the detail rate
    pw, ph = cfg.width // cfg.spatial_scale, cfg.height // cfg.spatial_scale
    proxy = resize_crop(seq[:: cfg.temporal_scale][: proxy_pixel_frames(cfg)], pw, ph)
    detail = resize_crop(seq[: cfg.frames], cfg.width, cfg.height) if cfg.stage == 2 else None
    return Clip(rec.caption, proxy, detail)


# --- encoding -----------------------------------------------------------------------------------------------


class LatentEncoder:
    """VAE (Wan-normalised latents) and text encoding of clips; caption embeddings are cached."""

    def __init__(self, vae, tokenizer, text_encoder, text_len: int, device, dtype):
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        self.text_len, self.device, self.dtype = text_len, torch.device(device), dtype
        c = int(vae.config.z_dim)
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def video(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, N, H, W) or a batch (B, 3, N, H, W) in [-1, 1] -> (B, C, f, h, w) latents (B = 1 for one clip),
        (x - mean) / std as Wan's pipeline normalises."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = (pixels if pixels.dim() == 5 else pixels[None]).to(self.device, vae_dtype)  # (B, 3, N, H, W)
        z = self.vae.encode(x).latent_dist.mode().float()  # the mean: deterministic
        z = (z - self.mean.to(z.device)) / self.std.to(z.device)
        return z.to(self.dtype)

    def text(self, caption: str) -> torch.Tensor:
        """(1, text_len, dim) embedding of one caption."""
        if caption not in self._text:
            self._text[caption] = encode_text(
                self.tokenizer, self.text_encoder, [caption], self.text_len, self.device, self.dtype
            )
        return self._text[caption]
