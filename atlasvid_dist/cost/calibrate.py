"""Measure, on one CUDA GPU, the peaks the cost model's memory constants stand for, next to what it predicts.

    python -m atlasvid_dist.cost.calibrate --out DIR      # writes DIR/cost-calibration.json

Cases (random weights: memory does not depend on their values): VAE decode of one 256 x 256 tile (fp32); one
forward of Wan2.1-1.3B shapes at 2K x 81 atlas (spatial scale 2, cached proxy, bf16); one forward of 14B shapes
at 720P x 81 with full attention (bf16). Needs torch with CUDA and diffusers; no Ray.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..config import AtlasConfig, VideoSpec, model_preset
from ..config.model import WAN21_VAE_DECODE
from ..config.parallel import ParallelPlan
from .model import RunSettings, estimate
from .profiles import device_profile


def _peak(fn, *args, **kwargs) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn(*args, **kwargs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def vae_tile(latent: int = 32, frames: int = 3) -> dict:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().cuda().eval()
    z = torch.randn(1, 16, frames, latent, latent, device="cuda")
    base = torch.cuda.memory_allocated()
    peak = _peak(vae.decode, z)
    px = (latent * 8) ** 2
    out = {
        "tile_px": latent * 8,
        "latent_frames": frames,
        "peak_above_weights_bytes": peak - base,
        "bytes_per_tile_pixel": (peak - base) / px,
        "modelled_bytes_per_tile_pixel": modelled_tile_pixel_bytes(latent),
    }
    del vae
    torch.cuda.empty_cache()
    return out


def modelled_tile_pixel_bytes(latent: int) -> float:
    """The cost model's peak of a Wan2.1 VAE tile decode per tile pixel on an H100: activations, cuDNN workspace and
    the tile's causal cache (what ``vae_tile`` measures)."""
    cost = WAN21_VAE_DECODE
    workspace = device_profile("h100").conv_workspace * cost.conv_io_bytes_per_tile_pixel
    return cost.bytes_per_tile_pixel + workspace + cost.state_bytes_per_cell / 64  # a latent cell is 8 x 8 pixels


def transformer_alone(video: VideoSpec, spec, cfg: AtlasConfig):
    """The cost model's report for one forward of the transformer alone on one GPU (what a measured peak of a bare
    forward holds: no text encoder or VAE on the device, no CFG, bf16)."""
    return estimate(
        video,
        spec,
        cfg,
        ParallelPlan(workers=1, device="cuda", gpus=1),
        RunSettings(guidance=1.0, dtype="bf16", offload_encoders=True),
        "h100",
    )


def transformer_peak(model: str, res: str, mode: str, spatial_scale: int) -> dict:
    from diffusers import WanTransformer3DModel

    from ..models.atlas_transformer import AtlasTransformer

    spec, video = model_preset(model), VideoSpec.from_res(res, frames=81)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            tr = WanTransformer3DModel(
                num_attention_heads=spec.num_heads,
                attention_head_dim=spec.head_dim,
                ffn_dim=spec.ffn_dim,
                num_layers=spec.num_layers,
                text_dim=spec.text_dim,
            )
    finally:
        torch.set_default_dtype(torch.float32)
    tr = tr.to(torch.bfloat16).eval()
    cfg = AtlasConfig(mode=mode, spatial_scale=spatial_scale)
    m = AtlasTransformer(tr, cfg)
    lat = (video.latent_frames, video.gen_height // 8, video.gen_width // 8)
    x = torch.randn(1, 16, *lat, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, spec.text_len, spec.text_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    kw = {}
    if mode == "atlas":
        pg = m.proxy_geometry(m.token_grid(x)).grid
        proxy = torch.randn(1, 16, pg.t, pg.h * 2, pg.w * 2, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            kw["proxy_cache"] = m.build_proxy_cache(proxy, text)
    t0 = time.perf_counter()
    peak = _peak(m, x, t, text, **kw)
    seconds = time.perf_counter() - t0
    r = transformer_alone(video, spec, cfg)
    del m, tr, kw
    torch.cuda.empty_cache()
    return {
        "model": model,
        "res": res,
        "mode": mode,
        "tokens": r.detail_tokens,
        "peak_bytes": peak,
        "modelled_bytes": r.memory["detail_stage"]["total"],
        "modelled_parts": r.memory["detail_stage"],
        "forward_s": seconds,
        "modelled_forward_s_lower_bound": r.seconds["detail_step"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--skip-14b", action="store_true")
    args = p.parse_args(argv)
    rows = {"vae_tile": vae_tile(), "wan1.3b_2k_atlas": transformer_peak("wan2.1-1.3b", "2k", "atlas", 2)}
    print(json.dumps(rows, indent=1), flush=True)
    if not args.skip_14b:
        rows["wan14b_720p_full"] = transformer_peak("wan2.1-14b", "720p", "full", 1)
    rows["device"] = torch.cuda.get_device_name()
    rows["torch"] = torch.__version__
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cost-calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
