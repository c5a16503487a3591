"""Builders shared by the commands (plan, generate): one parser per option, one builder per config.

The options themselves (flags, defaults, help) are in cli/options.py, read from the config dataclasses. Builders
turn option values into the validated config dataclasses; every bad value is a ConfigError naming the option
(exit code 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.method import MODES, AtlasConfig
from ..config.model import MODEL_PRESETS, WAN_BASE, BaseSize, ModelSpec
from ..config.parallel import ParallelPlan
from ..config.video import VideoSpec
from ..errors import ConfigError, check
from ..geometry.grid import Grid, latent_grid, token_grid
from ..geometry.windows import auto_window


# -- parsing and building -------------------------------------------------------------------------------------
def parse_triple(field: str, text: str) -> tuple[int, int, int]:
    """'3,15,16' -> (3, 15, 16); anything else is a ConfigError naming the option."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ConfigError(field, text, "must be three integers T,H,W (e.g. 3,15,16)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def build_video(res: str, frames: int, fps: int) -> VideoSpec:
    return VideoSpec.from_res(res, frames=frames, fps=fps)


def resolve_model(model: str) -> ModelSpec:
    """A preset name (shapes only) or a diffusers-format Wan2.1 folder (its configs are read, no weights)."""
    if model in MODEL_PRESETS:
        return MODEL_PRESETS[model]
    from pathlib import Path

    from ..models.loading import BUILTIN_FOLDERS

    if model not in BUILTIN_FOLDERS and not Path(model).exists():
        raise ConfigError("model", model, f"is neither a preset ({'|'.join(MODEL_PRESETS)}) nor an existing folder")
    from ..models.loading import read_model_spec

    return read_model_spec(model)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model folder says about running it (its atlasvid_model.json): option defaults and its base size."""

    options: dict
    """Option name -> default, between the command's own defaults and a --config file / the command line."""
    base: BaseSize
    """The size it was trained at and its window (Wan2.1's 720P when the folder says nothing)."""


def model_defaults(model: str, known: set[str] | None = None) -> ModelDefaults:
    """Read ``model``'s own defaults; an option outside ``known`` (None: any) is refused naming the file
    (ConfigError). Adapter paths (``lora_stage1``/``lora_stage2``) are relative to the folder."""
    from ..models.loading import DEFAULTS_FILE, model_folder, read_model_defaults

    found = read_model_defaults(model)
    if not found:
        return ModelDefaults({}, WAN_BASE)
    where = f"{model_folder(model) / DEFAULTS_FILE}"
    options = found.get("generate", {})
    if not isinstance(options, dict):
        raise ConfigError("generate", options, f"in {where} must be a mapping of option defaults")
    for key in options:
        if known is not None and key not in known:
            raise ConfigError(key, options[key], f"in {where}: unknown option; known: {sorted(known)}")
    for key in ("lora_stage1", "lora_stage2"):
        if isinstance(options.get(key), str):
            options[key] = str(model_folder(model) / options[key])
    try:
        base = BaseSize.from_defaults(found)
    except (TypeError, ConfigError) as e:
        raise ConfigError("model", model, f"{where}: base size/window invalid ({e})") from None
    return ModelDefaults(options, base)


def detail_grid(video: VideoSpec, model: ModelSpec) -> Grid:
    return token_grid(latent_grid(video.frames, video.gen_height, video.gen_width), model.patch)


def auto_spatial_scale(grid: Grid, frame_tokens: int = WAN_BASE.frame_tokens) -> int:
    """Smallest divisor s of both h and w with a proxy frame (h/s x w/s) of at most ``frame_tokens`` tokens.

    4K (135 x 240) -> 3, 2K (90 x 160) -> 2, 8K (270 x 480) -> 6, 720P -> 1: a 720P-sized proxy, tokens aligned.
    """
    g = math.gcd(grid.h, grid.w)
    for s in range(1, g + 1):
        if g % s == 0 and (grid.h // s) * (grid.w // s) <= frame_tokens:
            return s
    return g


def build_method(
    grid: Grid,
    *,
    attention: str,
    window,
    spatial_scale: int,
    pad_windows: bool = False,
    base: BaseSize | None = None,
    **settings,
) -> AtlasConfig:
    """AtlasConfig from option values over the detail token ``grid`` (the one builder of generate and plan).

    ``window``: 'auto' (a window near the model's own window, (3, 15, 16) for Wan, that tiles the grid:
    :func:`auto_window`; padded only when no such window exists), 'T,H,W' or a triple. ``spatial_scale`` 0 picks
    :func:`auto_spatial_scale` (a proxy frame of at most the model's base size: 720P for Wan). ``base``: what the
    model folder says it was trained at (None: Wan2.1's 720P). Other ``settings`` are AtlasConfig fields;
    ``proxy_margin``/``ultragen_pool`` may be 'T,H,W' strings.
    """
    base = base or BaseSize()
    check(attention in MODES, "attention", attention, f"must be one of {MODES}")
    check(
        isinstance(spatial_scale, int) and spatial_scale >= 0,
        "spatial_scale",
        spatial_scale,
        "must be an integer >= 0 (0 = auto)",
    )
    if spatial_scale == 0:
        spatial_scale = auto_spatial_scale(grid, base.frame_tokens)
    if window == "auto":
        window, padded = auto_window(grid, base.window)
        pad_windows = pad_windows or padded
    elif isinstance(window, str):
        window = parse_triple("window", window)
    for name in ("proxy_margin", "ultragen_pool"):
        if isinstance(settings.get(name), str):
            settings[name] = parse_triple(name, settings[name])
    return AtlasConfig(
        mode=attention, window=tuple(window), spatial_scale=spatial_scale, pad_windows=pad_windows, **settings
    )


def build_parallel(
    *,
    device: str,
    gpus: int,
    workers: int | None,
    proxy_parallel: str = "none",
    proxy_degree: int = 0,
    window_group: int = 1,
    window_parallel: str = "ulysses",
    window_order: str = "thw",
    shift_exchange: str = "kv",
) -> ParallelPlan:
    """ParallelPlan from option values: workers default to the GPUs (CUDA) or 1 (CPU); degree 0 = all workers."""
    check(device in ("cpu", "cuda"), "device", device, "must be cpu or cuda")
    check(device != "cuda" or gpus >= 1, "gpus", gpus, "must be >= 1 on CUDA (--device cpu runs CPU workers)")
    if workers is None:
        workers = gpus if device == "cuda" else 1
    degree = 1 if proxy_parallel == "none" else (proxy_degree or workers)
    check(proxy_degree >= 0, "proxy_degree", proxy_degree, "must be >= 0 (0 = all workers)")
    return ParallelPlan(
        workers=workers,
        device=device,
        gpus=gpus if device == "cuda" else 0,
        proxy_parallel=proxy_parallel,
        ulysses_degree=degree if proxy_parallel == "ulysses" else 1,
        ring_degree=degree if proxy_parallel == "ring" else 1,
        window_group=window_group,
        window_parallel=window_parallel,
        window_order=window_order,
        shift_exchange=shift_exchange,
    )
