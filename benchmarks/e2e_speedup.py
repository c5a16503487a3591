"""End-to-end speedup of AtlasVid over full attention, 4K x 81 frames on Wan2.1-1.3B shapes (H100, bf16), composed
from measured parts and the cost model, every component labelled with where its number comes from.

Measured (benchmarks/results/step-wan2.1-1.3b-cuda-bf16.json, H100, random weights): one 4K detail forward with
atlas attention, one 4K full-attention block (x layers: extrapolated), building the proxy keys/values, one 720P
full-attention forward. Not measured here: the stage-1 (proxy) forward, text encoding and the VAE decode; the
proxy forward is the measured 720P forward scaled by the cost model's FLOPs ratio (proxy step / 720P step), text
and decode come from the cost model's seconds (labelled estimates; decode is the same on both sides, priced tile by
tile: the order in which plan fits a 4K decode on one 80 GB GPU).

Fewer forwards: the rows with ``--cfg-until`` count the detail forwards by the rule generate runs
(``DetailSchedule``: guidance only in the first part of the schedule), each at the measured atlas forward's time.
The first-block cache is not composed here: which forwards it skips is decided at run time.

    python benchmarks/e2e_speedup.py [--steps 30] [--proxy-steps 30] [--guidance 5] [--init-strength 0.7]
        [--cfg-until 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, environment, save  # noqa: E402

from atlasvid_dist.config.generate import DetailSchedule  # noqa: E402

STEP = RESULTS / "step-wan2.1-1.3b-cuda-bf16.json"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--proxy-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--init-strength", type=float, default=0.7, help="--detail-init proxy: fraction of steps run")
    p.add_argument("--cfg-until", type=float, default=0.5, help="CFG truncation of the fewer-forwards rows")
    p.add_argument("--out", default=None)
    return p.parse_args()


def cost(res: str, mode: str, guidance: float = 1.0, steps: int = 30):
    """The cost model's report for Wan2.1-1.3B on one H100."""
    from atlasvid_dist.config import AtlasConfig, VideoSpec, model_preset
    from atlasvid_dist.config.parallel import ParallelPlan
    from atlasvid_dist.cost import RunSettings, estimate

    method = AtlasConfig(mode=mode, spatial_scale=3 if res == "4k" else 1, pad_windows=True)
    return estimate(
        VideoSpec.from_res(res, frames=81),
        model_preset("wan2.1-1.3b"),
        method,
        ParallelPlan(workers=1, device="cuda", gpus=1),
        RunSettings(dtype="bf16", steps=steps, proxy_steps=steps, guidance=guidance, decode_order="sequential"),
        "h100",
        suggest=False,
    )


def compose(args) -> dict:
    m = json.loads(STEP.read_text())["rows"]
    passes = 2 if args.guidance > 1 else 1
    atlas4k, p720 = cost("4k", "atlas", args.guidance, args.steps), cost("720p", "full")
    proxy_fwd = m["720p_full_forward_s"] * atlas4k.flops_per_step["proxy"] / passes / p720.flops_per_step["detail"]
    parts = {
        "text_encoder": (atlas4k.seconds["text_encoder"], "cost model (estimate)"),
        "vae_decode": (
            atlas4k.seconds["vae_decode"],
            "cost model (estimate), same for both; tile by tile (plan: fits one GPU)",
        ),
        "full_detail": (
            args.steps * passes * m["4k_full_forward_s_extrapolated"],
            "measured: one 4K full-attention block x 30 layers (extrapolated), x steps x passes",
        ),
        "atlas_proxy_stage": (
            args.proxy_steps * passes * proxy_fwd,
            "measured 720P full forward x cost-model FLOPs ratio (proxy step / 720P step)",
        ),
        "atlas_proxy_cache": (passes * m["4k_atlas_proxy_cache_build_s"], "measured, once per text embedding"),
        "atlas_detail": (args.steps * passes * m["4k_atlas_forward_s"], "measured 4K atlas forward x steps x passes"),
    }
    for name, init, until in (
        ("atlas_detail_proxy_init", "proxy", 1.0),
        ("atlas_detail_cfg_until", "noise", args.cfg_until),
        ("atlas_detail_proxy_init_cfg_until", "proxy", args.cfg_until),
    ):
        fwd = DetailSchedule.of(args.steps, init, args.init_strength, until).forwards(passes == 2)
        parts[name] = (
            fwd * m["4k_atlas_forward_s"],
            f"measured 4K atlas forward x {fwd} forwards (detail_init {init}, detail_cfg_until {until:g})",
        )
    sec = {k: v[0] for k, v in parts.items()}
    common = sec["text_encoder"] + sec["vae_decode"]
    full = common + sec["full_detail"]
    atlas = common + sec["atlas_proxy_stage"] + sec["atlas_proxy_cache"] + sec["atlas_detail"]
    atlas_init = atlas - sec["atlas_detail"] + sec["atlas_detail_proxy_init"]
    fewer = {k: atlas - sec["atlas_detail"] + sec[f"atlas_detail_{k}"] for k in ("cfg_until", "proxy_init_cfg_until")}
    return {
        "parts": {k: {"seconds": v[0], "source": v[1]} for k, v in parts.items()},
        "full_seconds": full,
        "atlas_seconds": atlas,
        "atlas_detail_init_proxy_seconds": atlas_init,
        "speedup": full / atlas,
        "speedup_detail_init_proxy": full / atlas_init,
        "atlas_cfg_until_seconds": fewer["cfg_until"],
        "speedup_cfg_until": full / fewer["cfg_until"],
        "atlas_detail_init_proxy_cfg_until_seconds": fewer["proxy_init_cfg_until"],
        "speedup_detail_init_proxy_cfg_until": full / fewer["proxy_init_cfg_until"],
        "per_step_speedup_measured": m["4k_per_step_speedup_atlas_vs_full_extrapolated"],
    }


def main() -> int:
    args = parse()
    r = compose(args)
    print(f"{'part':<26} {'seconds':>10}  source")
    for k, v in r["parts"].items():
        print(f"{k:<26} {v['seconds']:>10.1f}  {v['source']}")
    print(f"full attention, end to end          {r['full_seconds']:>10.1f} s")
    print(f"atlas, end to end                   {r['atlas_seconds']:>10.1f} s  -> {r['speedup']:.1f}x")
    print(
        f"atlas + --detail-init proxy         {r['atlas_detail_init_proxy_seconds']:>10.1f} s  -> "
        f"{r['speedup_detail_init_proxy']:.1f}x"
    )
    print(
        f"atlas + --detail-cfg-until {args.cfg_until:<8g} {r['atlas_cfg_until_seconds']:>10.1f} s  -> "
        f"{r['speedup_cfg_until']:.1f}x"
    )
    print(
        f"atlas + proxy init + cfg-until     {r['atlas_detail_init_proxy_cfg_until_seconds']:>10.1f} s  -> "
        f"{r['speedup_detail_init_proxy_cfg_until']:.1f}x"
    )
    payload = {
        "benchmark": "e2e-speedup-4k-composed",
        "model": "wan2.1-1.3b",
        "video": "3840x2160 x 81",
        "device": "NVIDIA H100 80GB HBM3 (the measured parts); composed on CPU",
        "settings": vars(args),
        "measured_from": str(STEP.relative_to(RESULTS.parent.parent)),
        "env": environment("cpu"),
        **r,
    }
    print(f"saved {save('e2e-speedup-4k-composed', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
