"""`atlasvid-dist train`: check the configuration and data here, then launch the DeepSpeed training script on N
local processes with torch.distributed.run (gloo on CPU, NCCL on GPUs); the adapter lands in OUTPUT/adapter.safetensors.

Bad configuration or data is reported before any process starts (exit 2, naming the field or file).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError, RunFailure

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "atlasvid_dist" / "train" / "train.py"
DEFAULT_DS = REPO / "configs" / "ds_zero2.json"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script_args: list[str], num_processes: int) -> list[str]:
    """The torch.distributed.run command line that starts ``num_processes`` ranks of the training script."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={num_processes}",
            "--master_addr", "127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT), *script_args]


def train(
    stage: int = typer.Option(..., "--stage", help="1: proxy LoRA; 2: detail LoRA (windows + proxy)."),
    data: str = typer.Option(..., "--data", help="Folder with videos and captions.jsonl, or one made by prepare-data."),
    output: str = typer.Option(..., "--output", help="Folder for checkpoints, log.jsonl and adapter.safetensors."),
    model: str = typer.Option("tiny", "--model", help="'tiny' or a diffusers Wan2.1 folder."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides the config)."),
    num_processes: int = typer.Option(1, "--num-processes", help="Local ranks (one per GPU; CPU processes)."),
    deepspeed_config: str = typer.Option(str(DEFAULT_DS), "--deepspeed-config", help="DeepSpeed JSON (ZeRO stage)."),
    config: Optional[str] = typer.Option(None, "--config", help="Training YAML (TrainConfig fields)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/checkpoints/latest."),
) -> None:
    """Train a LoRA adapter for stage 1 or 2 under DeepSpeed ZeRO."""
    from ..config.files import read_mapping
    from ..train.data import scan_dataset
    from ..train.shards import PreparedData, is_prepared
    from ..train.train import load_train_config, parse_args, tensorboard_writer

    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError("num_processes", num_processes, "must be an integer >= 1")
    args = ["--deepspeed_config", deepspeed_config, "--stage", str(stage), "--data", data, "--model", model,
            "--output", output]
    args += (["--config", config] if config else []) + (["--max-steps", str(max_steps)] if max_steps else [])
    args += ["--resume"] if resume else []
    cfg = load_train_config(parse_args(args))  # ConfigError naming the field, before anything starts
    read_mapping(deepspeed_config)
    if is_prepared(cfg.data):
        PreparedData(cfg.data, cfg)  # ConfigError if prepared with other geometry; InputError for a bad shard
    else:
        scan_dataset(cfg.data, cfg)  # InputError naming the file under bad_data='stop'
    if cfg.tensorboard:
        tensorboard_writer(cfg, Path(cfg.output)).close()  # refused here, not in every rank later
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(launch_command(args, num_processes), env=env)
    if proc.returncode != 0:
        raise RunFailure(f"training exited with status {proc.returncode} (see the output above)")
    typer.echo(f"adapter: {Path(output) / 'adapter.safetensors'}")


def prepare_data(
    data: str = typer.Option(..., "--data", help="Folder with videos and captions.jsonl."),
    output: str = typer.Option(..., "--output", help="Folder for the shards and index.json."),
    stage: int = typer.Option(1, "--stage", help="1: proxy clips; 2: detail + proxy clips."),
    model: str = typer.Option("tiny", "--model", help="'tiny' or a diffusers Wan2.1 folder (its VAE and text encoder)."),
    config: Optional[str] = typer.Option(None, "--config", help="Training YAML (its geometry is what is prepared)."),
    clips_per_video: int = typer.Option(1, "--clips-per-video", help="Clips per video, starts spread evenly."),
    shard_size: int = typer.Option(64, "--shard-size", help="Clips per shard file."),
) -> None:
    """Encode a dataset once (VAE latents of proxy and detail clips, text embeddings) into sharded safetensors;
    `train --data OUTPUT` then reads the shards instead of decoding and encoding videos every step."""
    from ..train.shards import PrepareOptions, prepare
    from ..train.train import load_train_config, parse_args

    opts = PrepareOptions(clips_per_video=clips_per_video, shard_size=shard_size)
    args = ["--deepspeed_config", str(DEFAULT_DS), "--stage", str(stage), "--data", data, "--model", model,
            "--output", output] + (["--config", config] if config else [])
    cfg = load_train_config(parse_args(args))
    prepare(cfg, output, opts, log=typer.echo)
