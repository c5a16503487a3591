"""One denoising step on full-size Wan2.1 shapes with random weights (speed does not depend on weight values).

Cases: 720P x 81 full attention; 4K x 81 full attention (one block timed, the rest extrapolated and labelled
so); 4K x 81 atlas (all blocks, proxy keys/values cached; building the cache is timed separately). Needs torch,
diffusers and this package only (no Ray).

``--preset cpu-mid`` tracks the same ratio on a CPU: a 2-layer model with Wan's head width (2 heads x 128) on a
9 x 30 x 48 token grid (12,960 tokens; Wan's default window (3, 15, 16), spatial scale 3), both forwards timed
whole. Both presets profile the atlas forward (torch.profiler) and split its time into GEMMs, attention kernels
and the rest (norms, modulation, RoPE, gathers): the part the issue wants at or under 30 %.

    python benchmarks/bench_step.py --model wan2.1-1.3b --device cuda --dtype bf16
    python benchmarks/bench_step.py --preset cpu-mid --device cpu --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save, timed  # noqa: E402

from atlasvid_dist import AtlasConfig, AtlasTransformer  # noqa: E402
from atlasvid_dist.config import model_preset  # noqa: E402
from atlasvid_dist.config.model import ModelSpec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_MID = ModelSpec("cpu-mid", num_layers=2, num_heads=2, head_dim=128, ffn_dim=1536, text_dim=256, text_len=64)
"""Wan's head width (128) and FFN ratio (~6x), two heads and two layers: a forward a 2-core CPU runs in seconds."""
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution", "aten::_convolution")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "flex_attention")


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


def modelled_forward_bytes(model: str, res: str, spatial_scale: int) -> int:
    """The cost model's detail-stage memory of one forward of ``model`` at ``res`` x 81, transformer alone."""
    from atlasvid_dist.config import VideoSpec
    from atlasvid_dist.cost.calibrate import transformer_alone

    cfg = AtlasConfig(mode="atlas", spatial_scale=spatial_scale)
    report = transformer_alone(VideoSpec.from_res(res, frames=81), model_preset(model), cfg)
    return report.memory["detail_stage"]["total"]


def kind_of(op: str) -> str:
    """'gemm', 'attention' or 'other' for a profiler op name."""
    if any(a in op for a in ATTENTION_OPS):
        return "attention"
    return "gemm" if op in GEMM_OPS else "other"


def profile_split(fn, device: str, top: int = 25) -> dict:
    """One profiled call of ``fn``: self time by kind (gemm / attention / other) and the top ops as a table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm-up
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        split[kind_of(e.key)] += getattr(e, key) / 1e6
    total = sum(split.values())
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return {
        "seconds_by_kind": split,
        "fraction_by_kind": {k: v / total for k, v in split.items()} if total else {},
        "table": events.table(sort_by=sort_by, row_limit=top),
    }


def cpu_mid(args) -> dict:
    """Atlas vs full forward at a CPU-sized grid, both timed whole; the atlas forward profiled."""
    spec, dtype, dev = CPU_MID, DTYPES[args.dtype], args.device
    tr = build(spec, dev, dtype)
    rows = {}
    with torch.no_grad():
        x, t, text = step_inputs((9, 60, 96), spec, dev, dtype)  # tokens (9, 30, 48)
        full = AtlasTransformer(tr, AtlasConfig(mode="full"))
        rows["full_forward_s"] = timed(lambda: full(x, t, text), dev, warmup=1, iters=args.iters)
        atlas = AtlasTransformer(tr, AtlasConfig(mode="atlas", spatial_scale=3))
        proxy = torch.randn(1, 16, 3, 20, 32, device=dev, dtype=dtype)  # proxy tokens (3, 10, 16)
        cache = atlas.build_proxy_cache(proxy, text)
        rows["atlas_forward_s"] = timed(lambda: atlas(x, t, text, proxy_cache=cache), dev, 1, args.iters)
        prof = profile_split(lambda: atlas(x, t, text, proxy_cache=cache), dev)
        if args.compile_blocks:  # the same two forwards with --compile-blocks (the first call compiles: warm-up)
            full_c = AtlasTransformer(tr, AtlasConfig(mode="full"), compile_blocks=True)
            rows["full_compiled_forward_s"] = timed(lambda: full_c(x, t, text), dev, warmup=1, iters=args.iters)
            atlas_c = AtlasTransformer(tr, atlas.atlas_config, compile_blocks=True)
            rows["atlas_compiled_forward_s"] = timed(lambda: atlas_c(x, t, text, proxy_cache=cache), dev, 1, args.iters)
    rows["per_step_speedup_atlas_vs_full"] = rows["full_forward_s"] / rows["atlas_forward_s"]
    if args.compile_blocks:
        rows["per_step_speedup_compiled"] = rows["full_compiled_forward_s"] / rows["atlas_compiled_forward_s"]
    return {"rows": rows, "profile": prof, "model": asdict(spec), "note": "both forwards timed whole (no CFG)"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("wan", "cpu-mid"), default="wan")
    p.add_argument("--model", default="wan2.1-1.3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument(
        "--compile-blocks",
        action="store_true",
        help="cpu-mid: also time both forwards compiled; wan: time the 4K forwards compiled only (own JSON)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.preset == "cpu-mid":
        result = cpu_mid(args)
        report(result["rows"], result["profile"])
        payload = {"benchmark": "denoising_step", "preset": "cpu-mid", "dtype": args.dtype, **result}
        payload["environment"] = environment(args.device)
        print("saved", save(f"step-cpu-mid-{args.device.split(':')[0]}-{args.dtype}", payload, args.out))
        return
    spec, dtype, dev = model_preset(args.model), DTYPES[args.dtype], args.device
    tr = build(spec, dev, dtype)
    rows, tag = {}, "-compiled" if args.compile_blocks else ""
    with torch.no_grad():
        full = AtlasTransformer(tr, AtlasConfig(mode="full"), compile_blocks=args.compile_blocks)
        if not args.compile_blocks:  # the compiled run times the 4K forwards only
            x, t, text = step_inputs((21, 90, 160), spec, dev, dtype)  # 720P x 81
            rows["720p_full_forward_s"] = timed(lambda: full(x, t, text), dev, warmup=1, iters=args.iters)
        x, t, text = step_inputs((21, 270, 480), spec, dev, dtype)  # 4K x 81
        block = one_block_seconds(full, x, t, text, dev, args.iters)
        rows[f"4k_full_block{tag}_s"] = block
        rows[f"4k_full_forward{tag}_s_extrapolated"] = block * spec.num_layers
        atlas = AtlasTransformer(tr, AtlasConfig(mode="atlas", spatial_scale=3), compile_blocks=args.compile_blocks)
        proxy = torch.randn(1, 16, 6, 90, 160, device=dev, dtype=dtype)  # 720P proxy, 4 fps, 6 latent frames
        rows["4k_atlas_proxy_cache_build_s"] = timed(lambda: atlas.build_proxy_cache(proxy, text), dev, 0, 1)
        cache = atlas.build_proxy_cache(proxy, text)
        rows["4k_atlas_proxy_cache_bytes"] = cache.kv.nbytes()
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rows[f"4k_atlas_forward{tag}_s"] = timed(lambda: atlas(x, t, text, proxy_cache=cache), dev, 1, args.iters)
        if dev.startswith("cuda"):
            rows["4k_atlas_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            rows["4k_atlas_modelled_memory_bytes"] = modelled_forward_bytes(args.model, "4k", 3)
        prof = profile_split(lambda: atlas(x, t, text, proxy_cache=cache), dev)
    rows[f"4k_per_step_speedup_atlas_vs_full{tag}_extrapolated"] = (
        rows[f"4k_full_forward{tag}_s_extrapolated"] / rows[f"4k_atlas_forward{tag}_s"]
    )
    report(rows, prof)
    payload = {
        "profile": prof,
        "benchmark": "denoising_step",
        "model": args.model,
        "dtype": args.dtype,
        "compile_blocks": args.compile_blocks,
        "rows": rows,
        "note": "one forward = one denoising step without CFG (CFG doubles both sides); 4K full is one block "
        "timed x num_layers (extrapolated; excludes patch embedding and head, which atlas includes); the modelled "
        "memory is the cost model's detail stage for the transformer alone (weights, proxy K/V, activations)",
        "environment": environment(dev),
    }
    print("saved", save(f"step-{args.model}-{dev.split(':')[0]}-{args.dtype}{tag}", payload, args.out))


def report(rows: dict, prof: dict) -> None:
    for k, v in rows.items():
        print(f"{k:50} {v:,.4f}" if isinstance(v, float) else f"{k:50} {v:,}")
    split = ", ".join(f"{k} {v:.0%}" for k, v in prof["fraction_by_kind"].items())
    print(f"atlas forward, profiled self time: {split}\n{prof['table']}")


if __name__ == "__main__":
    main()
