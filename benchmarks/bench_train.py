"""Training throughput: tokens per second, step time and peak memory of LoRA training, stage 1 and stage 2.

Two measurements, both printed and saved to benchmarks/results/train-<device>.json:

* ``launcher``: the real `atlasvid-dist train` (DeepSpeed ZeRO-2, N local processes, gloo on CPU / NCCL on
  GPUs) on a synthetic moving-shapes video set it writes itself, tiny model; the figures are the medians of the
  run's own log records (``log.jsonl``: tokens/s over all ranks, seconds per step, peak memory of rank 0) after
  the first ``--warmup`` steps.
* ``model-step``: one process, one optimizer step of the flow-matching loss with LoRA (peft) on a model of the
  given shapes with random weights (no downloads), AdamW on the adapter; CUDA: Wan2.1-1.3B at 720P (1280x704 x
  81 frames) in bf16 with gradient checkpointing; CPU: the tiny model. Median of ``--steps`` after one warm-up.

    python benchmarks/bench_train.py                       # CPU: launcher (2 processes) + tiny model-step
    python benchmarks/bench_train.py --device cuda         # adds Wan2.1-1.3B 720P model-step (needs a GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import environment, save  # noqa: E402

SMALL = dict(
    width=64,
    height=64,
    frames=9,
    fps=16.0,
    temporal_scale=2,
    spatial_scale=2,
    window=[3, 2, 2],
    text_len=16,
    lora_rank=4,
    lora_alpha=4.0,
    lr=3e-3,
    seed=0,
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--processes", type=int, default=2, help="launcher ranks")
    p.add_argument("--launcher-steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="model-step repetitions")
    p.add_argument("--model", default=None, help="model-step shapes (default: wan2.1-1.3b on CUDA, tiny on CPU)")
    p.add_argument("--out", default=None)
    return p.parse_args()


# -- the launcher -------------------------------------------------------------------------------------------------
def launcher(stage: int, args, tmp: Path) -> dict:
    import yaml

    from atlasvid_dist.train.synthetic import write_synthetic_dataset

    data = tmp / "data"
    if not data.exists():
        write_synthetic_dataset(data, num_videos=2, frames=17)
    conf = tmp / "small.yaml"
    conf.write_text(yaml.safe_dump(SMALL))
    out = tmp / f"stage{stage}"
    cmd = [
        sys.executable,
        "-m",
        "atlasvid_dist.cli.main",
        "train",
        "--stage",
        str(stage),
        "--data",
        str(data),
        "--model",
        "tiny",
        "--output",
        str(out),
        "--config",
        str(conf),
        "--max-steps",
        str(args.launcher_steps),
        "--num-processes",
        str(args.processes),
    ]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"training failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()][args.warmup :]
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    return {
        "stage": stage,
        "processes": args.processes,
        "zero": 2,
        "steps_measured": len(recs),
        "tokens_per_s": med("tokens_per_s"),
        "step_s": med("step_s"),
        "peak_mem_gb_rank0": med("peak_mem_gb"),
        "wall_s": time.perf_counter() - t0,
        "geometry": SMALL,
    }


# -- one model step -----------------------------------------------------------------------------------------------
def model_step(stage: int, spec_name: str, device: str, steps: int) -> dict:
    from atlasvid_dist.config.method import AtlasConfig
    from atlasvid_dist.config.model import model_preset
    from atlasvid_dist.models.atlas_transformer import AtlasTransformer
    from atlasvid_dist.train.config import TrainConfig
    from atlasvid_dist.train.train import FlowMatchingLoss, add_lora

    spec = model_preset(spec_name)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    w, h, f, window = (1280, 704, 81, (3, 11, 16)) if spec_name != "tiny" else (256, 256, 9, (3, 4, 8))
    cfg = TrainConfig(
        stage=stage,
        width=w,
        height=h,
        frames=f,
        window=window,
        text_len=spec.text_len,
        lora_rank=16,
        lora_alpha=16.0,
        gradient_checkpointing=cuda,
        spatial_scale=2,
    )
    tr = build_transformer(spec, device, dtype)
    add_lora(tr, cfg)
    if cfg.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    atlas = AtlasTransformer(
        tr, AtlasConfig(window=cfg.window, temporal_scale=cfg.temporal_scale, spatial_scale=cfg.spatial_scale)
    )
    loss_fn = FlowMatchingLoss(atlas, stage)
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-4)
    inputs, tokens = fake_batch(cfg, spec, device, dtype)

    def step():
        loss = loss_fn(**inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {
        "stage": stage,
        "model": spec_name,
        "video": f"{w}x{h}x{f}",
        "dtype": str(dtype).split(".")[-1],
        "tokens": tokens,
        "step_s": t,
        "tokens_per_s": tokens / t,
        "peak_mem_gib": peak,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "lora_rank": cfg.lora_rank,
    }


def build_transformer(spec, device: str, dtype):
    from diffusers import WanTransformer3DModel

    from atlasvid_dist.models.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        if spec.name == "tiny":
            tr = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        else:
            tr = WanTransformer3DModel(
                num_attention_heads=spec.num_heads,
                attention_head_dim=spec.head_dim,
                ffn_dim=spec.ffn_dim,
                num_layers=spec.num_layers,
                text_dim=spec.text_dim,
            )
    return tr.to(dtype)


def fake_batch(cfg, spec, device: str, dtype) -> tuple[dict, int]:
    """Random latents of the stage's geometry (as the data pipeline makes them), text embeddings, noise level."""
    from atlasvid_dist.train.data import VAE_TEMPORAL, proxy_pixel_frames

    lat = lambda frames, hh, ww: (16, (frames - 1) // VAE_TEMPORAL + 1, hh // 8, ww // 8)  # noqa: E731
    s = cfg.spatial_scale
    proxy = torch.randn(1, *lat(proxy_pixel_frames(cfg), cfg.height // s, cfg.width // s), device=device, dtype=dtype)
    detail = torch.randn(1, *lat(cfg.frames, cfg.height, cfg.width), device=device, dtype=dtype)
    x0 = proxy if cfg.stage == 1 else detail
    inputs = dict(
        x0=x0,
        noise=torch.randn_like(x0),
        sigma=torch.tensor([0.5], device=device, dtype=dtype),
        text=torch.randn(1, spec.text_len, spec.text_dim, device=device, dtype=dtype),
    )
    if cfg.stage == 2:
        inputs["proxy"] = proxy
    return inputs, x0[0, 0].numel() // 4  # latent cells / (1 x 2 x 2) patch


def main() -> int:
    args = parse()
    rows = {"launcher": [], "model_step": []}
    if args.device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            for stage in (1, 2):
                rows["launcher"].append(launcher(stage, args, Path(tmp)))
                print("launcher", rows["launcher"][-1], flush=True)
    spec = args.model or ("wan2.1-1.3b" if args.device == "cuda" else "tiny")
    for stage in (1, 2):
        rows["model_step"].append(model_step(stage, spec, args.device, args.steps))
        print("model-step", rows["model_step"][-1], flush=True)
    payload = {"benchmark": "train-throughput", "env": environment(args.device), **rows}
    print(f"saved {save(f'train-{args.device}', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
