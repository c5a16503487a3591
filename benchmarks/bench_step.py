"""One denoising step on full-size Wan2.1 shapes with random weights (speed does not depend on weight values).

Cases: 720P x 81 full attention; 4K x 81 full attention (one block timed, the rest extrapolated and labelled
so); 4K x 81 atlas (all blocks, proxy keys/values cached; building the cache is timed separately). Needs torch,
diffusers and this package only (no Ray).

    python benchmarks/bench_step.py --model wan2.1-1.3b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save, timed  # noqa: E402

from atlasvid_dist import AtlasConfig, AtlasTransformer  # noqa: E402
from atlasvid_dist.config import model_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(spec, device, dtype):
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        tr = WanTransformer3DModel(
            num_attention_heads=spec.num_heads,
            attention_head_dim=spec.head_dim,
            ffn_dim=spec.ffn_dim,
            num_layers=spec.num_layers,
            text_dim=spec.text_dim,
        )
    return tr.to(dtype).eval()


def step_inputs(lat, spec, device, dtype):
    x = torch.randn(1, 16, *lat, device=device, dtype=dtype)
    text = torch.randn(1, spec.text_len, spec.text_dim, device=device, dtype=dtype)
    return x, torch.tensor([500.0], device=device), text


def one_block_seconds(model, x, t, text, device, iters):
    """Time block 0 alone (full attention over every token) with the inputs the forward would give it."""
    tr = model.transformer
    grid = model.token_grid(x)
    from atlasvid_dist.models.attention.detail import DetailAttention

    attend = DetailAttention(model.atlas_config, grid, model.rotary, x.device)
    h = tr.patch_embedding(x).flatten(2).transpose(1, 2)
    _, tproj, enc, _ = tr.condition_embedder(t, text, None)
    tproj = tproj.unflatten(1, (6, -1))
    return timed(lambda: model._block(0, tr.blocks[0], h, enc, tproj, attend), device, warmup=1, iters=iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wan2.1-1.3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    spec, dtype, dev = model_preset(args.model), DTYPES[args.dtype], args.device
    tr = build(spec, dev, dtype)
    rows = {}
    with torch.no_grad():
        full = AtlasTransformer(tr, AtlasConfig(mode="full"))
        x, t, text = step_inputs((21, 90, 160), spec, dev, dtype)  # 720P x 81
        rows["720p_full_forward_s"] = timed(lambda: full(x, t, text), dev, warmup=1, iters=args.iters)
        x, t, text = step_inputs((21, 270, 480), spec, dev, dtype)  # 4K x 81
        block = one_block_seconds(full, x, t, text, dev, args.iters)
        rows["4k_full_block_s"] = block
        rows["4k_full_forward_s_extrapolated"] = block * spec.num_layers
        atlas = AtlasTransformer(tr, AtlasConfig(mode="atlas", spatial_scale=3))
        proxy = torch.randn(1, 16, 6, 90, 160, device=dev, dtype=dtype)  # 720P proxy, 4 fps, 6 latent frames
        rows["4k_atlas_proxy_cache_build_s"] = timed(lambda: atlas.build_proxy_cache(proxy, text), dev, 0, 1)
        cache = atlas.build_proxy_cache(proxy, text)
        rows["4k_atlas_proxy_cache_bytes"] = cache.kv.nbytes()
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rows["4k_atlas_forward_s"] = timed(lambda: atlas(x, t, text, proxy_cache=cache), dev, 1, args.iters)
        if dev.startswith("cuda"):
            rows["4k_atlas_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    rows["4k_per_step_speedup_atlas_vs_full_extrapolated"] = (
        rows["4k_full_forward_s_extrapolated"] / rows["4k_atlas_forward_s"]
    )
    for k, v in rows.items():
        print(f"{k:50} {v:,.4f}" if isinstance(v, float) else f"{k:50} {v:,}")
    payload = {
        "benchmark": "denoising_step",
        "model": args.model,
        "dtype": args.dtype,
        "rows": rows,
        "note": "one forward = one denoising step without CFG (CFG doubles both sides); 4K full is one block "
        "timed x num_layers (extrapolated; excludes patch embedding and head, which atlas includes)",
        "environment": environment(dev),
    }
    print("saved", save(f"step-{args.model}-{dev.split(':')[0]}-{args.dtype}", payload, args.out))


if __name__ == "__main__":
    main()
