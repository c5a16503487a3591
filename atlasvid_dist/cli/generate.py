"""`atlasvid-dist generate`: parse -> GenerateConfig (validated) -> run the stages -> print a summary.

Every option can also be set in a YAML/JSON file given with --config (keys are the option names with
underscores); options on the command line override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config.fields import KIND_RULES, config_fields, is_kind
from ..config.files import read_mapping
from ..config.generate import GenerateConfig
from ..config.method import AtlasConfig
from ..config.model import BaseSize
from ..config.parallel import ParallelPlan
from ..config.video import VideoSpec
from ..errors import AtlasError, ConfigError, InputError, RunFailure
from .common import build_method, build_parallel, model_defaults
from .options import DEFAULTS, DISTRIBUTED, OPTION_KINDS, OPTIONS, OUTPUT, RUN, option, with_default

__all__ = ["DEFAULTS", "OPTION_KINDS", "KIND_RULES", "build_config", "flatten_config_file", "generate"]

#: GenerateConfig's own settings, by option name (everything but the video and the method).
RUN_KEYS = tuple(name for name in config_fields(GenerateConfig) if name not in ("video", "method"))
#: The options that go to the AtlasConfig (``attention`` is its ``mode``; ``window``/``spatial_scale`` may be
#: 'auto'/0, rules :func:`~.common.build_method` applies).
METHOD_KEYS = tuple(name for name, o in OPTIONS.items() if o.source is AtlasConfig)
#: How a distributed run is spread (ParallelPlan; command line only).
DIST_KEYS = ("proxy_parallel", "window_group", "window_parallel", "window_order", "shift_exchange")


NO_ADAPTER = "none"
"""``--lora-stage1 none``: run without the adapter the model folder ships."""

RESUME_OVERRIDES = ("out", "save_latents", "save_proxy", "crf")
"""What a resumed run may write elsewhere than the stored config says (its outputs; nothing that changes them)."""


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
    own = model_defaults(values.get("model", DEFAULTS["model"]), set(DEFAULTS))
    check_kinds(own.options)
    v = {**DEFAULTS, **own.options, **values}
    video = VideoSpec.from_res(v.pop("res"), frames=v.pop("frames"), fps=v.pop("fps"))
    method = _method(v, video, own.base)
    run = {k: v.pop(k) for k in RUN_KEYS if k in v}
    for key in ("lora_stage1", "lora_stage2"):
        if run.get(key) == NO_ADAPTER:  # the model's own adapter switched off
            run[key] = None
    if v:
        key = sorted(v)[0]
        raise ConfigError(key, v[key], f"unknown option; known: {sorted(DEFAULTS)}")
    if run.get("prompt") is None:
        raise ConfigError("prompt", None, "is required (--prompt TEXT or 'prompt:' in --config)")
    return GenerateConfig(video=video, method=method, **run)


def _method(v: dict, video: VideoSpec, base: BaseSize) -> AtlasConfig:
    """Pop the method options from ``v`` (option names) and build the AtlasConfig (plan's builder too)."""
    from ..geometry.grid import latent_grid, token_grid

    grid = token_grid(latent_grid(video.frames, video.gen_height, video.gen_width))
    return build_method(grid, base=base, **{k: v.pop(k) for k in METHOD_KEYS})


def check_kinds(values: dict) -> None:
    """Refuse (ConfigError naming the option) a value of the wrong kind, e.g. ``out: 123`` or ``window: 5`` in a
    --config file, before any of them is used; unknown options are left to :func:`build_config`."""
    for name, value in values.items():
        kind = OPTION_KINDS.get(name)
        if kind is not None and not is_kind(kind, value):
            raise ConfigError(name, value, KIND_RULES[kind])


def generate(
    # video
    res: Optional[str] = option("res"),
    frames: Optional[int] = option("frames"),
    fps: Optional[int] = option("fps"),
    # method
    attention: Optional[str] = option("attention"),
    window: Optional[str] = option("window"),
    shift: Optional[bool] = option("shift"),
    shift_axes: Optional[str] = option("shift_axes"),
    pad_windows: Optional[bool] = option("pad_windows"),
    temporal_scale: Optional[int] = option("temporal_scale"),
    spatial_scale: Optional[int] = option("spatial_scale"),
    proxy_context: Optional[str] = option("proxy_context"),
    proxy_margin: Optional[str] = option("proxy_margin"),
    proxy_mode: Optional[str] = option("proxy_mode"),
    max_window_batch: Optional[int] = option("max_window_batch"),
    backend: Optional[str] = option("backend"),
    ultragen_pool: Optional[str] = option("ultragen_pool"),
    ultragen_weight: Optional[float] = option("ultragen_weight"),
    # model
    model: Optional[str] = option("model"),
    lora_stage1: Optional[str] = option("lora_stage1"),
    lora_stage2: Optional[str] = option("lora_stage2"),
    dtype: Optional[str] = option("dtype"),
    text_len: Optional[int] = option("text_len"),
    # run
    prompt: Optional[str] = option("prompt"),
    negative_prompt: Optional[str] = option("negative_prompt"),
    steps: Optional[int] = option("steps"),
    proxy_steps: Optional[int] = option("proxy_steps"),
    guidance: Optional[float] = option("guidance"),
    flow_shift: Optional[float] = option("flow_shift"),
    proxy_flow_shift: Optional[float] = option("proxy_flow_shift"),
    seed: Optional[int] = option("seed"),
    detail_init: Optional[str] = option("detail_init"),
    init_strength: Optional[float] = option("init_strength"),
    detail_cfg_until: Optional[float] = option("detail_cfg_until"),
    detail_reuse: Optional[float] = option("detail_reuse"),
    ffn_chunk: Optional[int] = option("ffn_chunk"),
    offload_encoders: Optional[bool] = option("offload_encoders"),
    host_mmap_threshold: Optional[int] = option("host_mmap_threshold"),
    compile_blocks: Optional[bool] = option("compile_blocks"),
    device: Optional[str] = option("device", note="With --gpus: cuda; with --workers: cpu unless set."),
    device_profile: Optional[str] = option("device_profile"),
    config: Optional[Path] = typer.Option(
        None,
        help=with_default("YAML/JSON file setting any option (options override it).", "none"),
        rich_help_panel=RUN,
        show_default=False,
    ),
    # distributed
    workers: Optional[int] = typer.Option(
        None,
        help=with_default("Distributed on Ray: N detail workers on CPU (gloo).", "none: one process"),
        rich_help_panel=DISTRIBUTED,
        show_default=False,
    ),
    gpus: Optional[int] = typer.Option(
        None,
        help=with_default("Distributed on Ray: N detail workers, one GPU each (NCCL).", "none: one process"),
        rich_help_panel=DISTRIBUTED,
        show_default=False,
    ),
    ray_address: Optional[str] = typer.Option(
        None,
        help=with_default("Join this Ray cluster (auto|ADDR).", "none: start Ray embedded"),
        rich_help_panel=DISTRIBUTED,
        show_default=False,
    ),
    proxy_parallel: str = option("proxy_parallel", cli_default=True, note="With --workers/--gpus."),
    window_group: int = option("window_group", cli_default=True, note="With --workers/--gpus."),
    window_parallel: str = option("window_parallel", cli_default=True, note="ring is planned, refused for now."),
    window_order: str = option("window_order", cli_default=True, note="With --workers/--gpus; plan prices both."),
    shift_exchange: str = option("shift_exchange", cli_default=True, note="With --workers/--gpus."),
    # output
    out: Optional[str] = option("out"),
    save_proxy: Optional[str] = option("save_proxy"),
    save_latents: Optional[str] = option("save_latents"),
    crf: Optional[int] = option("crf"),
    decode_tile: Optional[int] = option("decode_tile"),
    decode_overlap: Optional[int] = option("decode_overlap"),
    decode_batch: Optional[int] = option("decode_batch"),
    decode_order: Optional[str] = option("decode_order"),
    run_dir: Optional[str] = option("run_dir"),
    resume: Optional[str] = typer.Option(
        None,
        help=with_default("Continue the run in this folder from its last committed step.", "none"),
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
    overwrite_run_dir: bool = typer.Option(
        False,
        "--overwrite-run-dir",
        help=with_default(
            "Clear the --run-dir folder of a previous run first (without it, a folder that holds a run is refused).",
            "off",
        ),
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        help=with_default("No progress bars or lines, no library bars or warnings, nothing on stderr.", "off"),
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
    json_out: bool = typer.Option(
        False,
        "--json",
        help=with_default(
            "Print, last, one JSON object: paths, geometry, seconds, peak memory per rank, model, seed, bytes "
            "sent per rank.",
            "off",
        ),
        rich_help_panel=OUTPUT,
        show_default=False,
    ),
) -> None:
    """Generate a video: proxy (low fps, low resolution) then detail (windows + proxy), tiled decode, mp4."""
    given = dict(locals())
    dist_flags = {k: given[k] for k in DIST_KEYS}
    flags = {k: v for k, v in given.items() if k in DEFAULTS and v is not None}
    ranks = _distributed(workers, gpus, flags)
    if ranks is None and dist_flags != {k: OPTIONS[k].value for k in DIST_KEYS}:
        raise ConfigError(
            "proxy_parallel/window_group/window_order/shift_exchange",
            dist_flags,
            "need --workers or --gpus (a distributed run)",
        )
    if resume:
        cfg = _resume_config(resume, flags)
        requested_device = cfg.device
    else:
        # only what the user set: build_config puts it over the model folder's defaults, those over DEFAULTS
        values = {**(flatten_config_file(read_mapping(config)) if config else {}), **flags}
        requested_device = values.get("device", DEFAULTS["device"])
        if workers is not None and requested_device == "auto":
            values["device"] = "cpu"  # --workers: CPU workers (gloo) unless a device is named
        cfg = build_config(values)
    if quiet:
        from .quiet import silence_libraries

        silence_libraries()
    else:
        warn_random_weights(cfg.model)
    device_line = f"device: {cfg.device}" + (" (auto)" if requested_device == "auto" else "")
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
            note=device_line,
        )
    run(cfg, resume=bool(resume), progress=not quiet, overwrite=overwrite_run_dir, json_out=json_out, note=device_line)


def random_weights_warning(model: str) -> str | None:
    """The warning for a model with random weights (the built-in tiny model), None for one with trained weights."""
    from ..pipeline.report import model_info

    if not model_info(model)["random_weights"]:
        return None
    return (
        f"warning: model {model!r} has random weights: the video will be noise (use --model <folder> for real weights)"
    )


def warn_random_weights(model: str) -> None:
    """Say on stderr, before anything loads, that the run's video will be noise (--quiet leaves it out)."""
    line = random_weights_warning(model)
    if line:
        typer.echo(line, err=True)


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
        if flags.get("device", "cuda") not in ("cuda", "auto"):
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
    cfg: GenerateConfig,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    json_out: bool = False,
    note: str = "",
):
    from ..pipeline.generate import TwoStageGenerator

    return _report(
        lambda: TwoStageGenerator(cfg, progress=progress).run(resume=resume, overwrite=overwrite), json_out, note
    )


def run_distributed(
    cfg: GenerateConfig,
    plan: ParallelPlan,
    ray_address: str | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    json_out: bool = False,
    note: str = "",
):
    from ..runtime.driver import DistributedGenerator

    return _report(
        lambda: DistributedGenerator(cfg, plan.workers, ray_address, progress=progress, plan=plan).run(
            resume=resume, overwrite=overwrite
        ),
        json_out,
        note,
    )


def _report(run_fn, json_out: bool = False, note: str = ""):
    """Run, print the summary and ``note`` (e.g. the device) under it (and with ``json_out`` the result's JSON
    object as the last line, its wall time included); a failure that is not a typed input error becomes RunFailure
    (exit code 1)."""
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
    if note:
        typer.echo(note)
    if json_out:
        import json

        typer.echo(json.dumps({**result.to_dict(), "wall_seconds": wall}))
    return result
