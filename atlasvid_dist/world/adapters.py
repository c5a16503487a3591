"""Stage C of `world train`: the AtlasVid LoRAs of the shapes model, trained by `atlasvid-dist train` (DeepSpeed
ZeRO-2, ADAPTER_PROCESSES processes) on world clips, exactly as generate uses them.

- stage 1 (the proxy): r_t = 4, so a clip of 4(F-1)+1 frames at the base fps is trained as its F-frame proxy at
  the base size (the transformer's own size) with temporally scaled RoPE; on its own, larger set of clips
  (``proxy_clips``) and for its own steps (``proxy_lora_steps``), since a proxy example costs a fraction of a
  detail example and the proxy is the layout every detail window reads;
- stage 2 (the detail): windows of the model's own size over a detail clip of ``detail_scale`` x the base size
  (``detail_frames`` cut from the middle of each render), reading the clean proxy's keys/values made with the
  frozen stage-1 adapter (`train --lora-stage1`); windows that do not tile the detail grid in time are padded, as
  generate pads them.

The clips are rendered once (H.264, crf 0: lossless) and encoded once per stage (`prepare-data`'s shards,
ENCODE_BATCH clips per VAE call), so the ranks run neither the VAE nor the text encoder. Each stage is resumable: a finished adapter is kept, an
interrupted run continues from its checkpoint with `train --resume`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import RunFailure
from .clips import WorldClip
from .model import FLOW_SHIFT, SHAPES_TEXT_LEN
from .scene import all_scenes

ADAPTER_PROCESSES = 2
"""Ranks of each `atlasvid-dist train` run (DeepSpeed over gloo on CPU)."""
TEMPORAL_SCALE = 4
"""r_t of the shipped adapters: proxy fps = fps / 4 (a 65-frame video from a 17-frame proxy at base size)."""
ADAPTER_SEED_BASE = 2000
"""Start seeds of the adapter clips (the latent pool uses 1000+, the evaluation 0, 1, 2)."""
ADAPTER_FILES = {1: "lora_stage1.safetensors", 2: "lora_stage2.safetensors"}
"""Where the model folder holds each stage's adapter (its defaults name them)."""
ENCODE_BATCH = 8
"""Clips per VAE call of the stages' prepare-data (twice as fast per clip on CPU as one at a time)."""
SECONDS = "seconds.json"
"""A finished stage's wall time (kept so a resumed recipe still reports it)."""


def adapter_frames(base_frames: int) -> int:
    """Detail frames whose r_t-subsampled proxy has the base frame count: 4 (F - 1) + 1."""
    return TEMPORAL_SCALE * (base_frames - 1) + 1


def stage_clips(plan, stage: int) -> int:
    """World clips the stage's LoRA trains on."""
    return (plan.proxy_clips or plan.adapter_clips) if stage == 1 else plan.adapter_clips


def stage_steps(plan, stage: int) -> int:
    """Optimizer steps of the stage's LoRA."""
    return (plan.proxy_lora_steps or plan.lora_steps) if stage == 1 else plan.lora_steps


def stage_scale(plan, stage: int) -> int:
    """Size, per side as a multiple of the base size, of the clips the stage's LoRA reads (stage 1 their proxy)."""
    return (plan.detail_scale or plan.adapter_scale) if stage == 2 else plan.adapter_scale


def stage_frames(plan, stage: int) -> int:
    """Detail frames of one training clip of the stage (stage 1 trains on their proxy)."""
    return (stage == 2 and plan.detail_frames) or adapter_frames(plan.frames)


def clips_folder(plan, stage: int) -> str:
    """Name of the stage's rendered clips under checkpoints/ (stages with the same clips share them)."""
    count, scale = stage_clips(plan, stage), stage_scale(plan, stage)
    name = "adapter_clips" if count == plan.adapter_clips else f"adapter_clips_{count}"
    return name if scale == plan.adapter_scale else f"{name}_{scale}x"


def write_adapter_clips(folder: Path, plan, count: int, scale: int) -> Path:
    """``count`` world clips (clip i: caption i mod 32, start seed ADAPTER_SEED_BASE + i) of 4(F-1)+1 frames at
    ``scale`` x the base size, once."""
    from .clips import write_clips

    if (folder / "captions.jsonl").is_file():
        return folder
    scenes = all_scenes()
    clips = [WorldClip(scenes[i % len(scenes)], ADAPTER_SEED_BASE + i) for i in range(count)]
    w, h = plan.width * scale, plan.height * scale
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_clips(
        tmp,
        [(c.scene, c.motion(w, h)) for c in clips],
        frames=adapter_frames(plan.frames),
        width=w,
        height=h,
        fps=plan.fps,
        crf=0,
    )
    tmp.rename(folder)
    return folder


def stage_settings(plan, stage: int, seed: int, window: list[int]) -> dict:
    """The TrainConfig mapping of one adapter stage (the YAML `train --config` reads)."""
    scale, steps = stage_scale(plan, stage), stage_steps(plan, stage)
    common = dict(
        stage=stage,
        width=plan.width * scale,
        height=plan.height * scale,
        frames=stage_frames(plan, stage),
        fps=plan.fps,
        temporal_scale=TEMPORAL_SCALE,
        spatial_scale=scale,
        text_len=SHAPES_TEXT_LEN,
        lora_rank=plan.lora_rank,
        lora_alpha=float(plan.lora_rank),
        lr=plan.lora_lr,
        lr_schedule="cosine",
        warmup_steps=max(1, steps // 10),
        max_steps=steps,
        timestep_shift=FLOW_SHIFT,
        seed=seed + stage,
        save_every=plan.save_every,
        log_every=plan.log_every,
    )
    if stage == 2:
        common.update(window=list(window), pad_windows=True)
    return common


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "atlasvid_dist.cli.main", *args]


def _run(cmd: list[str], what: str) -> None:
    status = subprocess.run(cmd).returncode
    if status != 0:
        raise RunFailure(f"world train: {what} exited with status {status}: {' '.join(cmd)}")


def train_adapter(out: Path, plan, stage: int, seed: int, window: list[int], log: Callable[[str], None]) -> float:
    """Prepare the stage's data and run `atlasvid-dist train` for it (resuming an interrupted run); copy the
    adapter into the model folder. Returns the seconds spent (0 when the adapter was already there)."""
    from ..train.shards import is_prepared

    target = out / ADAPTER_FILES[stage]
    work = out / "checkpoints" / f"lora{stage}"
    if target.is_file() and (work / SECONDS).is_file():
        return float(json.loads((work / SECONDS).read_text()))
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    folder = out / "checkpoints" / clips_folder(plan, stage)
    clips = write_adapter_clips(folder, plan, stage_clips(plan, stage), stage_scale(plan, stage))
    yaml = work / "train.yaml"
    yaml.write_text(json.dumps(stage_settings(plan, stage, seed, window), indent=2) + "\n")  # JSON is YAML
    data = work / "data"
    if not is_prepared(data):
        shutil.rmtree(data, ignore_errors=True)
        args = ["--stage", str(stage), "--data", str(clips), "--model", str(out), "--config", str(yaml)]
        batch = ["--encode-batch", str(ENCODE_BATCH)]
        _run(_cli("prepare-data", *args, *batch, "--output", str(data), "--quiet"), f"prepare-data (stage {stage})")
    run = work / "run"
    cmd = _cli(
        "train",
        "--stage",
        str(stage),
        "--config",
        str(yaml),
        "--data",
        str(data),
        "--model",
        str(out),
        "--output",
        str(run),
        "--num-processes",
        str(ADAPTER_PROCESSES),
    )
    if stage == 2:
        cmd += ["--lora-stage1", str(out / ADAPTER_FILES[1])]
    if (run / "checkpoints").is_dir():
        cmd.append("--resume")
    log(f"lora{stage}: {' '.join(cmd[3:])}")
    _run(cmd, f"train (stage {stage})")
    seconds = time.perf_counter() - start
    (work / SECONDS).write_text(json.dumps(round(seconds, 1)))
    shutil.copyfile(run / "adapter.safetensors", target)
    log(f"lora{stage}: {target.name} ({seconds:.0f} s)")
    return seconds


def adapter_defaults() -> dict:
    """The generate defaults that make the shipped adapters the model's own (paths relative to the folder)."""
    return {"lora_stage1": ADAPTER_FILES[1], "lora_stage2": ADAPTER_FILES[2]}


__all__ = [
    "ADAPTER_FILES",
    "adapter_defaults",
    "adapter_frames",
    "stage_clips",
    "stage_steps",
    "train_adapter",
    "write_adapter_clips",
]
