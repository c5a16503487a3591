"""`atlasvid-dist train`: check the configuration and data here, then launch the DeepSpeed training script on N
local processes with torch.distributed.run (gloo on CPU, NCCL on GPUs); the adapter lands in OUTPUT/adapter.safetensors.

Bad configuration, data or paths are reported before any process starts (exit 2, naming the field or file): the
model folder (or "tiny"), the DeepSpeed JSON, the data folder and a writable output folder. The launcher runs in a
session of its own and dies with this command (train/launch.py): SIGTERM/SIGINT are forwarded to it, and a
SIGKILLed command takes it and its ranks down through parent-death signals.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from ..configs import DEEPSPEED_PRESETS, DEFAULT_DEEPSPEED
from ..errors import ConfigError, InputError, RunFailure

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the atlasvid_dist package (site-packages for an install, the checkout for an editable one)."""
SCRIPT = PACKAGE_ROOT / "atlasvid_dist" / "train" / "train.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script_args: list[str], num_processes: int) -> list[str]:
    """The torch.distributed.run command line that starts ``num_processes`` ranks of the training script."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        f"--nproc_per_node={num_processes}",
        "--master_addr",
        "127.0.0.1",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        *script_args,
    ]


def _train_help(name: str) -> str:
    """An option's help from TrainConfig's field: its docstring and its default (one source)."""
    from ..config.fields import config_fields
    from ..train.config import TrainConfig
    from .options import with_default

    info = config_fields(TrainConfig)[name]
    return with_default(info.doc, str(info.default))


def train(
    stage: int = typer.Option(..., "--stage", help="1: proxy LoRA; 2: detail LoRA (see --mode)."),
    mode: Optional[str] = typer.Option(
        None,
        "--mode",
        help=_train_help("mode"),
    ),
    data: str = typer.Option(..., "--data", help="Folder with videos and captions.jsonl, or one made by prepare-data."),
    output: str = typer.Option(..., "--output", help="Folder for checkpoints, log.jsonl and adapter.safetensors."),
    model: str = typer.Option("tiny", "--model", help="'tiny' or a diffusers Wan2.1 folder."),
    max_steps: Optional[int] = typer.Option(None, "--steps", "--max-steps", help="Optimizer steps in total."),
    res: Optional[str] = typer.Option(
        None, "--res", help="Detail training size WIDTHxHEIGHT. [default: 128x128 for --model tiny, else 1280x704]"
    ),
    frames: Optional[int] = typer.Option(None, "--frames", help="Clip length, 4k+1. [default: 9 tiny, else 81]"),
    fps: Optional[float] = typer.Option(None, "--fps", help=_train_help("fps")),
    lr: Optional[float] = typer.Option(None, "--lr", help=_train_help("lr")),
    batch: Optional[int] = typer.Option(None, "--batch", help=_train_help("batch")),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help=_train_help("grad_accum")),
    seed: Optional[int] = typer.Option(None, "--seed", help=_train_help("seed")),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help=_train_help("warmup_steps")),
    save_every: Optional[int] = typer.Option(None, "--save-every", help=_train_help("save_every")),
    num_processes: int = typer.Option(1, "--num-processes", help="Local ranks (one per GPU; CPU processes)."),
    deepspeed_config: str = typer.Option(
        DEFAULT_DEEPSPEED,
        "--deepspeed-config",
        "--deepspeed_config",
        help=f"DeepSpeed JSON file, or a packaged one: {'|'.join(DEEPSPEED_PRESETS)}.",
    ),
    config: Optional[str] = typer.Option(None, "--config", help="Training YAML (TrainConfig fields)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/checkpoints/latest."),
    lora_stage1: Optional[str] = typer.Option(
        None,
        "--lora-stage1",
        help="Stage 2: the frozen stage-1 adapter (required; its proxy keys/values are what generate reads).",
    ),
    no_stage1_adapter: bool = typer.Option(
        False, "--no-stage1-adapter", help="Stage 2 without a stage-1 adapter (the proxy from the base weights)."
    ),
) -> None:
    """Train a LoRA adapter for stage 1 or 2 under DeepSpeed ZeRO."""
    from ..configs import read_deepspeed_config
    from ..train.data import scan_dataset
    from ..train.launch import run_launcher, signal_name
    from ..train.shards import PreparedData, is_prepared
    from ..train.train import (
        given_fields,
        load_train_config,
        merge_deepspeed,
        parse_args,
        resumable,
        tensorboard_writer,
    )

    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError("num_processes", num_processes, "must be an integer >= 1")
    args = (
        [
            "--deepspeed_config",
            deepspeed_config,
            "--stage",
            str(stage),
            "--data",
            data,
            "--model",
            model,
            "--output",
            output,
        ]
        + (["--config", config] if config else [])
        + (["--resume"] if resume else [])
    )
    flags = dict(
        mode=mode,
        max_steps=max_steps,
        res=res,
        frames=frames,
        fps=fps,
        lr=lr,
        batch=batch,
        grad_accum=grad_accum,
        seed=seed,
        warmup_steps=warmup_steps,
        save_every=save_every,
    )
    args += [a for k, v in flags.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]
    args += (["--lora-stage1", lora_stage1] if lora_stage1 else []) + (
        ["--no-stage1-adapter"] if no_stage1_adapter else []
    )
    parsed = parse_args(args)
    cfg = load_train_config(parsed)  # ConfigError naming the field, before anything starts
    check_paths(cfg, output, deepspeed_config)
    check_stage1_adapter(cfg)
    cfg = merge_deepspeed(read_deepspeed_config(deepspeed_config), cfg, given_fields(parsed), num_processes)[1]
    if resume:
        resumable(output)  # ConfigError for a folder holding only DeepSpeed .pt checkpoints (never loaded)
    if is_prepared(cfg.data):
        PreparedData(cfg.data, cfg)  # ConfigError if prepared with other geometry; InputError for a bad shard
    else:
        scan_dataset(cfg.data, cfg)  # InputError naming the file under bad_data='stop'
    if cfg.tensorboard:
        tensorboard_writer(cfg, Path(cfg.output)).close()  # refused here, not in every rank later
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    status = run_launcher(launch_command(args, num_processes), env)
    if status != 0:
        by = signal_name(status)
        raise RunFailure(f"training exited with status {status}" + (f" ({by})" if by else " (see the output above)"))
    typer.echo(f"adapter: {Path(output) / 'adapter.safetensors'}")


def prepare_data(
    data: str = typer.Option(..., "--data", help="Folder with videos and captions.jsonl."),
    output: str = typer.Option(..., "--output", help="Folder for the shards and index.json."),
    stage: int = typer.Option(1, "--stage", help="1: proxy clips; 2: detail + proxy clips."),
    model: str = typer.Option(
        "tiny", "--model", help="'tiny' or a diffusers Wan2.1 folder (its VAE and text encoder)."
    ),
    config: Optional[str] = typer.Option(None, "--config", help="Training YAML (its geometry is what is prepared)."),
    clips_per_video: int = typer.Option(1, "--clips-per-video", help="Clips per video, starts spread evenly."),
    shard_size: int = typer.Option(64, "--shard-size", help="Clips per shard file."),
    encode_batch: int = typer.Option(
        1, "--encode-batch", help="Clips per VAE call (faster per clip on CPU; holds as many clips' activations)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress (bar or lines) and no library bars or warnings."),
) -> None:
    """Encode a dataset once (VAE latents of proxy and detail clips, text embeddings) into sharded safetensors;
    `train --data OUTPUT` then reads the shards instead of decoding and encoding videos every step.

    Progress goes to stderr: clips done/total, seconds per clip and ETA, as a bar on a terminal, else a line at
    every 10 % of the clips."""
    from ..train.shards import PrepareOptions, prepare
    from ..train.train import load_train_config, parse_args

    opts = PrepareOptions(clips_per_video=clips_per_video, shard_size=shard_size, encode_batch=encode_batch)
    args = ["--stage", str(stage), "--data", data, "--model", model, "--output", output] + (
        ["--config", config] if config else []
    )
    cfg = load_train_config(parse_args(args))
    check_paths(cfg, output)
    if quiet:
        from .quiet import silence_libraries

        silence_libraries()
    prepare(cfg, output, opts, log=typer.echo, progress=not quiet)


def check_paths(cfg, output: str, deepspeed_config: str | None = None) -> None:
    """Before any work: the model, the DeepSpeed JSON (when given), the data folder and a writable output folder,
    each error naming the path (exit 2)."""
    check_model(cfg.model)
    if deepspeed_config is not None:
        check_deepspeed_file(deepspeed_config)
    if not Path(cfg.data).is_dir():
        raise InputError(f"{cfg.data}: data folder does not exist (or is not a folder)")
    check_writable(output)


def check_stage1_adapter(cfg) -> None:
    """Stage 2: the stage-1 adapter is given and is a readable safetensors file (ModelLoadError naming it), or the
    run says it trains without one (a loud line on stderr)."""
    from ..models.loading import check_safetensors_file
    from ..train.train import NO_ADAPTER, no_adapter_warning, require_stage1_adapter

    require_stage1_adapter(cfg)
    if cfg.stage == 2 and cfg.lora_stage1 != NO_ADAPTER:
        check_safetensors_file(cfg.lora_stage1)
    if no_adapter_warning(cfg):
        typer.echo(no_adapter_warning(cfg), err=True)


def check_model(model: str) -> None:
    """'tiny', or a diffusers Wan2.1 folder that looks loadable (configs, components, weight files; nothing loaded)."""
    from ..models.loading import validate_model_dir

    if str(model) != "tiny":
        validate_model_dir(model)  # ModelLoadError naming the folder or file


def check_deepspeed_file(spec: str) -> None:
    """The DeepSpeed config (a packaged name or a file) exists, is a JSON object and has a zero_optimization
    section."""
    from ..configs import read_deepspeed_config

    read_deepspeed_config(spec)


def check_writable(output: str) -> None:
    """Create the output folder if needed and write (then remove) a probe file in it; ConfigError naming it if
    either fails (a read-only folder, a path under a regular file, no permission)."""
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError("output", str(out), f"is not a writable folder ({e.strerror or e})") from None
