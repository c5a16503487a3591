"""`atlasvid-dist generate`: parse -> GenerateConfig (validated) -> run the stages -> print a summary.

Every option can also be set in a YAML/JSON file given with --config (keys are the option names with
underscores); options on the command line override the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from ..config.files import read_mapping
from ..config.generate import WAN_NEGATIVE_PROMPT, GenerateConfig
from ..config.method import AtlasConfig
from ..config.parallel import ParallelPlan
from ..config.video import VideoSpec
from ..errors import AtlasError, ConfigError, InputError, RunFailure
from .common import build_method, build_parallel

DEFAULTS = dict(
    res="720p",
    frames=81,
    fps=16,
    model="tiny",
    steps=30,
    proxy_steps=30,
    guidance=5.0,
    seed=0,
    attention="atlas",
    window="auto",
    shift=True,
    shift_axes="thw",
    temporal_scale=4,
    spatial_scale=0,
    proxy_context="aligned",
    pad_windows=False,
    detail_init="noise",
    init_strength=0.7,
    device="cpu",
    dtype="auto",
    out="out.mp4",
    negative_prompt=WAN_NEGATIVE_PROMPT,
    flow_shift=5.0,
    proxy_flow_shift=5.0,
    backend="auto",
    ultragen_pool="1,4,4",
    ultragen_weight=0.5,
)
RUN_KEYS = (
    "prompt",
    "negative_prompt",
    "model",
    "lora_stage1",
    "lora_stage2",
    "steps",
    "proxy_steps",
    "guidance",
    "flow_shift",
    "proxy_flow_shift",
    "seed",
    "detail_init",
    "init_strength",
    "device",
    "dtype",
    "out",
    "save_proxy",
    "save_latents",
    "crf",
    "run_dir",
    "text_len",
    "device_profile",
    "decode_tile",
    "decode_overlap",
)


#: The kind of value every option takes in a --config file (the command line's parser already enforces them).
OPTION_KINDS = {
    **dict.fromkeys(
        (
            "frames",
            "fps",
            "steps",
            "proxy_steps",
            "seed",
            "temporal_scale",
            "spatial_scale",
            "crf",
            "text_len",
            "decode_tile",
            "decode_overlap",
            "max_window_batch",
        ),
        "int",
    ),
    **dict.fromkeys(("guidance", "flow_shift", "proxy_flow_shift", "init_strength", "ultragen_weight"), "float"),
    **dict.fromkeys(("shift", "pad_windows"), "bool"),
    **dict.fromkeys(
        (
            "prompt",
            "negative_prompt",
            "model",
            "res",
            "attention",
            "shift_axes",
            "proxy_context",
            "backend",
            "detail_init",
            "device",
            "dtype",
            "out",
            "device_profile",
            "proxy_mode",
        ),
        "str",
    ),
    **dict.fromkeys(("lora_stage1", "lora_stage2", "save_proxy", "save_latents", "run_dir"), "str?"),
    **dict.fromkeys(("window", "proxy_margin", "ultragen_pool"), "triple"),
}
KIND_RULES = {
    "int": "must be an integer",
    "float": "must be a finite number",
    "bool": "must be true or false",
    "str": "must be a text (quote it in YAML)",
    "str?": "must be a text (a path) or null",
    "triple": "must be three integers T,H,W: '3,15,16' or [3, 15, 16]",
}


RESUME_OVERRIDES = ("out", "save_latents", "save_proxy", "crf")
"""What a resumed run may write elsewhere than the stored config says (its outputs; nothing that changes them)."""


#: Method settings a --config file (or its ``method:`` section) may set beyond the options above; AtlasConfig's
#: own defaults apply when they are absent.
EXTRA_METHOD_KEYS = ("schedule", "proxy_margin", "proxy_mode", "max_window_batch", "ultragen_pool", "ultragen_weight")


def flatten_config_file(mapping: dict) -> dict:
    """A --config mapping with its optional ``method:`` section (AtlasConfig's own field names, as in
    configs/method/*.yaml) lifted to option names; ``mode`` is the option ``attention``. A key set twice (at the top
    and in ``method:``) is refused by name."""
    out = dict(mapping)
    section = out.pop("method", None)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError("method", section, "must be a mapping of method settings (AtlasConfig fields)")
    for key, value in {**section, **({"mode": out.pop("mode")} if "mode" in out else {})}.items():
        name = "attention" if key == "mode" else key
        if name in out:
            raise ConfigError(f"method.{key}", value, f"is also set at the top level as {name!r}; set it once")
        out[name] = value
    return out


def build_config(values: dict) -> GenerateConfig:
    """Merged option values -> GenerateConfig; raises ConfigError naming the option."""
    check_kinds(values)
    v = dict(values)
    video = VideoSpec.from_res(v.pop("res"), frames=v.pop("frames"), fps=v.pop("fps"))
    method = _method(v, video)
    run = {k: v.pop(k) for k in RUN_KEYS if k in v}
    if v:
        key = sorted(v)[0]
        known = sorted(set(DEFAULTS) | set(RUN_KEYS) | set(EXTRA_METHOD_KEYS))
        raise ConfigError(key, v[key], f"unknown option; known: {known}")
    if run.get("prompt") is None:
        raise ConfigError("prompt", None, "is required (--prompt TEXT or 'prompt:' in --config)")
    return GenerateConfig(video=video, method=method, **run)


def _method(v: dict, video: VideoSpec) -> AtlasConfig:
    """Pop the method options from ``v`` (option names) and build the AtlasConfig (plan's builder too)."""
    from ..geometry.grid import latent_grid, token_grid

    grid = token_grid(latent_grid(video.frames, video.gen_height, video.gen_width))
    extra = {k: v.pop(k) for k in EXTRA_METHOD_KEYS if k in v}
    return build_method(
        grid,
        attention=v.pop("attention"),
        window=v.pop("window"),
        shift=v.pop("shift"),
        shift_axes=v.pop("shift_axes"),
        temporal_scale=v.pop("temporal_scale"),
        spatial_scale=v.pop("spatial_scale"),
        proxy_context=v.pop("proxy_context"),
        pad_windows=v.pop("pad_windows"),
        backend=v.pop("backend"),
        **extra,
    )


def check_kinds(values: dict) -> None:
    """Refuse (ConfigError naming the option) a value of the wrong kind, e.g. ``out: 123`` or ``window: 5`` in a
    --config file, before any of them is used; unknown options are left to :func:`build_config`."""
    for name, value in values.items():
        kind = OPTION_KINDS.get(name)
        if kind is not None and not _is_kind(kind, value):
            raise ConfigError(name, value, KIND_RULES[kind])


def _is_kind(kind: str, value: object) -> bool:
    """True when ``value`` is of ``kind`` (see OPTION_KINDS); bools are not numbers, floats must be finite."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "str?":
        return value is None or isinstance(value, str)
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_kind("int", x) for x in value)
    )


def generate(
    prompt: Optional[str] = typer.Option(None, help="Text prompt (required here or in --config)."),
    negative_prompt: Optional[str] = typer.Option(
        None, help="Negative prompt for guidance; '' for none. [default: Wan2.1's own, see README]"
    ),
    model: Optional[str] = typer.Option(
        None, help="'tiny' (built in, offline) or a local diffusers Wan2.1 T2V folder. [default: tiny]"
    ),
    lora_stage1: Optional[str] = typer.Option(None, help="LoRA safetensors for the proxy stage."),
    lora_stage2: Optional[str] = typer.Option(None, help="LoRA safetensors for the detail stage."),
    res: Optional[str] = typer.Option(
        None,
        help="480p|720p|1080p|2k|4k|8k or WIDTHxHEIGHT (pixels, multiples of 16; 1080p pads to 1088 and crops). [default: 720p]",
    ),
    frames: Optional[int] = typer.Option(None, help="Frames, 4k+1. [default: 81]"),
    fps: Optional[int] = typer.Option(None, help="Frames per second of the output. [default: 16]"),
    steps: Optional[int] = typer.Option(None, help="Detail-stage denoising steps. [default: 30]"),
    proxy_steps: Optional[int] = typer.Option(None, help="Proxy-stage denoising steps. [default: 30]"),
    guidance: Optional[float] = typer.Option(
        None, help="Classifier-free guidance scale; <= 1 disables it. [default: 5.0]"
    ),
    flow_shift: Optional[float] = typer.Option(None, help="Flow-matching shift, detail stage. [default: 5.0]"),
    proxy_flow_shift: Optional[float] = typer.Option(None, help="Flow-matching shift, proxy stage. [default: 5.0]"),
    seed: Optional[int] = typer.Option(None, help="Random seed. [default: 0]"),
    attention: Optional[str] = typer.Option(None, help="atlas|ultragen|full. [default: atlas]"),
    window: Optional[str] = typer.Option(
        None,
        help="Window in tokens T,H,W (1 token = 4 frames x 16 x 16 px), or auto: near 3,15,16 and tiling the size (3,15,16 at 720P/2K/4K/8K). [default: auto]",
    ),
    shift: Optional[bool] = typer.Option(
        None, "--shift/--no-shift", help="Alternate half-shifted windows over layers. [default: shift]"
    ),
    shift_axes: Optional[str] = typer.Option(
        None,
        help="Axes shifted windows move along: thw or e.g. hw (no shift in time: far less halo traffic between ranks). [default: thw]",
    ),
    pad_windows: Optional[bool] = typer.Option(
        None,
        "--pad-windows/--no-pad-windows",
        help="Allow windows that do not tile the grid (masked padding). [default: no]",
    ),
    temporal_scale: Optional[int] = typer.Option(None, help="r_t: proxy fps = fps / r_t. [default: 4]"),
    spatial_scale: Optional[int] = typer.Option(
        None,
        help="Detail tokens per proxy token in height and width; 0 = auto (a proxy of at most 720P: 4K -> 3, 2K -> 2, 8K -> 6). [default: 0]",
    ),
    proxy_context: Optional[str] = typer.Option(None, help="all|aligned proxy keys per window. [default: aligned]"),
    proxy_margin: Optional[str] = typer.Option(
        None, help="Extra proxy tokens T,H,W on each side of the aligned region. [default: 1,1,1]"
    ),
    proxy_mode: Optional[str] = typer.Option(
        None,
        help="clean (proxy at timestep 0, keys/values cached once) | joint (re-noised to each detail step, no cache; on every rank with --workers). [default: clean]",
    ),
    max_window_batch: Optional[int] = typer.Option(
        None, help="Windows per attention call (bounds transient memory); 0 = all. [default: 0]"
    ),
    backend: Optional[str] = typer.Option(None, help="auto|sdpa|flex|reference attention kernel. [default: auto]"),
    ultragen_pool: Optional[str] = typer.Option(
        None,
        help="With --attention ultragen: pooling cell T,H,W of the compressed global branch (q, k, v averaged per cell). [default: 1,4,4]",
    ),
    ultragen_weight: Optional[float] = typer.Option(
        None, help="With --attention ultragen: w in (1 - w) * windows + w * global. [default: 0.5]"
    ),
    detail_init: Optional[str] = typer.Option(None, help="noise|proxy: detail start. [default: noise]"),
    init_strength: Optional[float] = typer.Option(
        None, help="With --detail-init proxy: fraction of steps run. [default: 0.7]"
    ),
    device: Optional[str] = typer.Option(None, help="cpu|cuda. [default: cpu]"),
    dtype: Optional[str] = typer.Option(
        None, help="auto|fp32|bf16|fp16 (auto: bf16 on CUDA, fp32 on CPU). [default: auto]"
    ),
    out: Optional[str] = typer.Option(
        None, help="Output .mp4 (written under a temporary name, renamed when complete). [default: out.mp4]"
    ),
    save_proxy: Optional[str] = typer.Option(None, help="Also write the proxy video (.mp4)."),
    save_latents: Optional[str] = typer.Option(
        None, help="Also write the final detail latents (.safetensors), before decoding."
    ),
    crf: Optional[int] = typer.Option(
        None, help="H.264 quality, 0-51 (lower is better); 0 = lossless RGB. [default: 18]"
    ),
    run_dir: Optional[str] = typer.Option(None, help="Commit a checkpoint after every step in this folder."),
    resume: Optional[str] = typer.Option(None, help="Continue the run in this folder from its last committed step."),
    overwrite_run_dir: bool = typer.Option(
        False,
        "--overwrite-run-dir",
        help="Clear the --run-dir folder of a previous run first (without it, a folder that holds a run is refused).",
    ),
    device_profile: Optional[str] = typer.Option(
        None, help="Pre-flight memory check profile: h100|h200|cpu|FILE.yaml. [default: by device]"
    ),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file setting any option (options override it)."),
    quiet: bool = typer.Option(False, help="No progress bars or lines, and no library bars or warnings."),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print, last, one JSON object: paths, geometry, seconds, peak memory per rank, model, seed, bytes sent per rank.",
    ),
    workers: Optional[int] = typer.Option(None, help="Distributed on Ray: N detail workers on CPU (gloo)."),
    gpus: Optional[int] = typer.Option(None, help="Distributed on Ray: N detail workers, one GPU each (NCCL)."),
    ray_address: Optional[str] = typer.Option(
        None, help="Join this Ray cluster (auto|ADDR); default: start Ray embedded."
    ),
    proxy_parallel: str = typer.Option(
        "none",
        help="With --workers/--gpus: stage 1 over all ranks with sequence parallelism: none (one actor)|ulysses|ring.",
    ),
    window_group: int = typer.Option(
        1, help="With --workers/--gpus: ranks sharing each window (split windows too big for one device)."
    ),
    window_parallel: str = typer.Option(
        "ulysses", help="How a split window is shared by its group: ulysses (ring is planned, refused for now)."
    ),
) -> None:
    """Generate a video: proxy (low fps, low resolution) then detail (windows + proxy), tiled decode, mp4."""
    dist_flags = dict(proxy_parallel=proxy_parallel, window_group=window_group, window_parallel=window_parallel)
    flags = {
        k: v
        for k, v in locals().items()
        if v is not None
        and k
        not in (
            "config",
            "resume",
            "quiet",
            "workers",
            "gpus",
            "ray_address",
            "dist_flags",
            "overwrite_run_dir",
            "json_out",
            *dist_flags,
        )
    }
    ranks = _distributed(workers, gpus, flags)
    if ranks is None and dist_flags != dict(proxy_parallel="none", window_group=1, window_parallel="ulysses"):
        raise ConfigError("proxy_parallel/window_group", dist_flags, "need --workers or --gpus (a distributed run)")
    if resume:
        cfg = _resume_config(resume, flags)
    else:
        cfg = build_config({**DEFAULTS, **(flatten_config_file(read_mapping(config)) if config else {}), **flags})
    if quiet:
        from .quiet import silence_libraries

        silence_libraries()
    if ranks is not None:
        plan = build_parallel(device=cfg.device, gpus=ranks if cfg.device == "cuda" else 0, workers=ranks, **dist_flags)
        return run_distributed(
            cfg,
            plan,
            ray_address,
            progress=not quiet,
            resume=bool(resume),
            overwrite=overwrite_run_dir,
            json_out=json_out,
        )
    run(cfg, resume=bool(resume), progress=not quiet, overwrite=overwrite_run_dir, json_out=json_out)


def _distributed(workers, gpus, flags: dict) -> int | None:
    """Detail ranks for --workers / --gpus (None: single process); --gpus sets the device to cuda."""
    if workers is not None and gpus is not None:
        raise ConfigError("gpus", gpus, "give either --workers (CPU) or --gpus (CUDA), not both")
    n = workers if workers is not None else gpus
    if n is None:
        return None
    if n < 1:
        raise ConfigError("workers" if workers is not None else "gpus", n, "must be >= 1")
    if gpus is not None:
        if flags.get("device", "cuda") != "cuda":
            raise ConfigError("device", flags["device"], "--gpus runs on cuda; use --workers for CPU")
        flags["device"] = "cuda"
    return n


def _resume_config(run_dir: str, flags: dict) -> GenerateConfig:
    """The stored run's GenerateConfig with the outputs the flags move; a damaged config.json is InputError (exit
    2) naming the file (the pipeline then checks it against the run's manifest checksum)."""
    from ..pipeline.run_folder import CONFIG_FILE, read_config

    stored = read_config(Path(run_dir))
    stored["run_dir"] = run_dir
    others = sorted(set(flags) - set(RESUME_OVERRIDES) - {"device"})
    if others:
        raise ConfigError(
            others[0],
            flags[others[0]],
            f"--resume continues the stored run; only "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} "
            f"may change",
        )
    stored.update({k: flags[k] for k in RESUME_OVERRIDES if k in flags})
    try:
        return GenerateConfig.from_dict(stored)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ConfigError is a ValueError
        raise InputError(
            f"{Path(run_dir) / CONFIG_FILE}: damaged run configuration ({type(e).__name__}: {e}); "
            f"the run cannot be resumed"
        ) from e


def run(
    cfg: GenerateConfig, resume: bool = False, progress: bool = True, overwrite: bool = False, json_out: bool = False
):
    from ..pipeline.generate import TwoStageGenerator

    return _report(lambda: TwoStageGenerator(cfg, progress=progress).run(resume=resume, overwrite=overwrite), json_out)


def run_distributed(
    cfg: GenerateConfig,
    plan: ParallelPlan,
    ray_address: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    json_out: bool = False,
):
    from ..runtime.driver import DistributedGenerator

    return _report(
        lambda: DistributedGenerator(cfg, plan.workers, ray_address, progress=progress, plan=plan).run(
            resume=resume, overwrite=overwrite
        ),
        json_out,
    )


def _report(run_fn, json_out: bool = False):
    """Run, print the summary (and with ``json_out`` the result's JSON object as the last line, its wall time
    included); a failure that is not a typed input error becomes RunFailure (exit code 1)."""
    import time

    t0 = time.perf_counter()
    try:
        result = run_fn()
    except AtlasError:
        raise
    except Exception as exc:  # a failure while running: exit code 1, with the cause
        raise RunFailure(f"{type(exc).__name__}: {exc}") from exc
    wall = time.perf_counter() - t0
    typer.echo(result.summary())
    if json_out:
        import json

        typer.echo(json.dumps({**result.to_dict(), "wall_seconds": wall}))
    return result
