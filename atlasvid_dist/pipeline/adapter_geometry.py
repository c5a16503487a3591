"""The geometry an adapter was trained at, kept in its safetensors metadata, and the warning when a run differs.

Training writes ``atlasvid_geometry`` (JSON) into adapter.safetensors: stage, method mode, window, spatial
scale(s), temporal scale r_t and the clip size the adapter saw (W x H x frames: the proxy clip for stage 1, the
detail clip for stage 2). ``generate`` and ``plan`` compare it with their run and print one line on stderr per
adapter whose geometry differs: a warning, not an error (an adapter may work outside its training geometry, but
the user should know). Sizes are not compared: generating at 4K from a 720P-trained adapter is the method.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import ModelLoadError

GEOMETRY_KEY = "atlasvid_geometry"
"""safetensors metadata key of the training geometry (a JSON object)."""
COMPARED = {1: ("temporal_scale",), 2: ("mode", "window", "spatial_scale", "temporal_scale")}
"""Fields a run must share with the adapter of each stage (stage 1's adapter makes the proxy and its K/V)."""
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # models.lora's name inside a folder


def training_geometry(cfg) -> dict:
    """The geometry of a TrainConfig: what the adapter saw."""
    from ..train.data import proxy_pixel_frames

    if cfg.stage == 1:
        s = cfg.spatial_scale
        return dict(
            stage=1,
            mode="full",
            window=None,
            spatial_scales=[s],
            temporal_scale=cfg.temporal_scale,
            width=cfg.width // s,
            height=cfg.height // s,
            frames=proxy_pixel_frames(cfg),
        )
    out = dict(
        stage=2,
        mode=cfg.mode,
        window=list(cfg.window),
        spatial_scales=list(cfg.scales),
        temporal_scale=cfg.temporal_scale,
        width=cfg.width,
        height=cfg.height,
        frames=cfg.frames,
    )
    if cfg.mode == "ultragen":
        m = cfg.method_config()
        out.update(ultragen_pool=list(m.ultragen_pool), ultragen_weight=m.ultragen_weight)
    return out


def geometry_metadata(geometry: dict) -> dict[str, str]:
    """The safetensors metadata entry holding ``geometry``."""
    return {GEOMETRY_KEY: json.dumps(geometry, sort_keys=True)}


def read_geometry(path: str | os.PathLike) -> dict | None:
    """The training geometry recorded in an adapter file (None when it records none); ModelLoadError naming the
    file when it is missing or unreadable."""
    from safetensors import safe_open

    from ..models.loading import check_safetensors_file

    file = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
    check_safetensors_file(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(GEOMETRY_KEY)
        return json.loads(raw) if raw else None
    except Exception as e:
        raise ModelLoadError(f"{file}: could not read its metadata {GEOMETRY_KEY} ({e})") from e


def run_geometry(method, width: int, height: int, frames: int) -> dict:
    """The geometry of a generation run: its AtlasConfig and output size."""
    return dict(
        mode=method.mode,
        window=list(method.window),
        spatial_scale=method.spatial_scale,
        temporal_scale=method.temporal_scale,
        width=width,
        height=height,
        frames=frames,
    )


def differences(trained: dict, run: dict, stage: int) -> list[str]:
    """Names of the compared fields in which ``run`` is outside what the adapter was trained at."""
    out = []
    for key in COMPARED[stage]:
        if key == "spatial_scale":
            if run[key] not in trained.get("spatial_scales", []):
                out.append(key)
        elif trained.get(key) != run[key]:
            out.append(key)
    return out


def _describe(g: dict, scale_key: str) -> str:
    window = f"window {tuple(g['window'])}, " if g.get("window") else ""
    scale = g[scale_key]
    scale = "/".join(map(str, scale)) if isinstance(scale, list) else scale
    return (
        f"mode {g['mode']}, {window}spatial scale {scale}, temporal scale {g['temporal_scale']}, "
        f"{g['width']}x{g['height']}x{g['frames']}"
    )


def mismatch_line(option: str, path, trained: dict, run: dict, stage: int) -> str | None:
    """The warning for one adapter, naming both geometries, or None when the run matches."""
    diff = differences(trained, run, stage)
    if not diff:
        return None
    return (
        f"warning: {option} {path} was trained at stage {trained.get('stage')} with "
        f"{_describe(trained, 'spatial_scales')}; this run uses {_describe(run, 'spatial_scale')} "
        f"(differs in {', '.join(diff)})"
    )


def warn_adapter_geometry(adapters: dict, run: dict, strict: bool = True, stream=None) -> list[str]:
    """Print (stderr) and return the mismatch lines of ``adapters`` ({1: path or None, 2: path or None}).

    ``strict``: a missing or unreadable file raises ModelLoadError; otherwise it is passed over (loading the
    adapter reports it). Adapters without recorded geometry are passed over."""
    lines = []
    for stage, path in sorted(adapters.items()):
        if not path:
            continue
        try:
            trained = read_geometry(path)
        except ModelLoadError:
            if strict:
                raise
            continue
        line = mismatch_line(f"--lora-stage{stage}", path, trained, run, stage) if trained else None
        if line:
            print(line, file=stream or sys.stderr, flush=True)
            lines.append(line)
    return lines
