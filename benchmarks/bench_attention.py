"""Attention benchmark: full vs atlas vs ultragen self-attention of one layer at the same token count.

Times DetailAttention (RoPE, window reorder, kernel, inverse reorder) with random q/k/v and proxy keys/values,
prints time, achieved FLOP/s (FLOPs from the project's cost model) and the speedup over full attention, and saves
JSON. Needs only torch and this package (no Ray, no diffusers), so it runs on a bare GPU machine.

    python benchmarks/bench_attention.py --preset cpu-small
    python benchmarks/bench_attention.py --preset wan-4k --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save, timed  # noqa: E402

from atlasvid_dist import AtlasConfig  # noqa: E402
from atlasvid_dist.cost.attention import layer_attention_flops  # noqa: E402
from atlasvid_dist.geometry import Grid, ProxyGeometry  # noqa: E402
from atlasvid_dist.models.attention.detail import DetailAttention, ProxyKV  # noqa: E402
from atlasvid_dist.models.rope import Rotary3D  # noqa: E402

PRESETS = {
    # name: (token grid, heads, head_dim, spatial_scale, pad_windows)
    "cpu-small": ((6, 30, 48), 4, 64, 3, False),
    "wan-720p": ((21, 45, 80), 12, 128, 1, False),
    "wan-2k": ((21, 90, 160), 12, 128, 2, False),
    "wan-4k": ((21, 135, 240), 12, 128, 3, False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(
    mode: str,
    backend: str,
    grid: Grid,
    heads: int,
    head_dim: int,
    scale: int,
    pad: bool,
    device: str,
    dtype,
    context: str = "aligned",
):
    cfg = AtlasConfig(mode=mode, backend=backend, spatial_scale=scale, pad_windows=pad, proxy_context=context)
    proxy = None
    if mode == "atlas":
        pgrid = ProxyGeometry(grid, cfg.temporal_scale, scale).grid
        pk = torch.randn(1, pgrid.size, heads, head_dim, device=device, dtype=dtype)
        proxy = ProxyKV(pgrid, [pk, pk], [pk.clone(), pk.clone()])
    s = float(scale)
    att = DetailAttention(cfg, grid, Rotary3D(head_dim), torch.device(device), proxy, (4.0, s, s))
    return cfg, att


def run_case(args, mode, backend, grid, heads, head_dim, scale, pad, context="aligned"):
    """One timed row; a failure (out of memory, no compiler) is recorded in the row, not fatal."""
    try:
        return _run_case(args, mode, backend, grid, heads, head_dim, scale, pad, context)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {
            "mode": mode,
            "backend": backend,
            "proxy_context": context if mode == "atlas" else None,
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
        }


def _run_case(args, mode, backend, grid, heads, head_dim, scale, pad, context="aligned"):
    dtype = DTYPES[args.dtype]
    q, k, v = (torch.randn(1, grid.size, heads, head_dim, device=args.device, dtype=dtype) for _ in range(3))
    cfg, att = build(mode, backend, grid, heads, head_dim, scale, pad, args.device, dtype, context)
    layer = 1 if args.shifted else 0

    def call():
        with torch.no_grad():
            att(layer, q, k, v)

    seconds = timed(call, args.device, warmup=args.warmup, iters=args.iters)
    flops = layer_attention_flops(cfg, grid, heads, head_dim, layer=layer)
    return {
        "mode": mode,
        "backend": backend,
        "proxy_context": context if mode == "atlas" else None,
        "seconds": seconds,
        "flops": flops,
        "tflops_per_s": flops / seconds / 1e12,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backends", default="sdpa", help="comma list for atlas/ultragen: sdpa,flex")
    p.add_argument("--skip-full", action="store_true", help="do not time full attention (too slow on CPU at scale)")
    p.add_argument("--shifted", action="store_true", help="time a shifted layer (padded windows) instead")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    dims, heads, head_dim, scale, pad = PRESETS[args.preset]
    grid = Grid(*dims)
    rows = []
    if not args.skip_full:
        rows.append(run_case(args, "full", "sdpa", grid, heads, head_dim, scale, pad))
    for backend in args.backends.split(","):
        for context in ("aligned", "all"):
            rows.append(run_case(args, "atlas", backend, grid, heads, head_dim, scale, pad, context))
        rows.append(run_case(args, "ultragen", backend, grid, heads, head_dim, scale, pad))
    full = next((r for r in rows if r["mode"] == "full" and "error" not in r), None)
    print(f"grid {grid.dims} = {grid.size:,} tokens, {heads} heads x {head_dim}, {args.dtype} on {args.device}")
    print(f"{'mode':9} {'backend':8} {'context':8} {'seconds':>10} {'TFLOP/s':>9} {'speedup':>9} {'FLOP ratio':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:9} {r['backend']:8} {str(r['proxy_context'] or '-'):8} failed: {r['error']}")
            continue
        if full:
            r["speedup_vs_full"] = full["seconds"] / r["seconds"]
            r["flop_ratio_vs_full"] = full["flops"] / r["flops"]
        print(
            f"{r['mode']:9} {r['backend']:8} {str(r['proxy_context'] or '-'):8} {r['seconds']:10.4f} "
            f"{r['tflops_per_s']:9.3f} {r.get('speedup_vs_full', float('nan')):9.1f} "
            f"{r.get('flop_ratio_vs_full', float('nan')):11.1f}"
        )
    payload = {
        "benchmark": "attention",
        "preset": args.preset,
        "grid": list(grid.dims),
        "heads": heads,
        "head_dim": head_dim,
        "dtype": args.dtype,
        "shifted_layer": args.shifted,
        "environment": environment(args.device),
        "rows": rows,
    }
    tag = f"attention-{args.preset}-{args.device.split(':')[0]}-{args.dtype}" + ("-shifted" if args.shifted else "")
    print("saved", save(tag, payload, args.out))
    return payload


if __name__ == "__main__":
    main()
