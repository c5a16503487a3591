"""AtlasVid's claim on the shapes world: a model trained at its base size, asked for 4x the size per side and 4x the
frames, with and without the method; every row scored by `atlasvid-dist eval`'s scorer against an analytic
re-render of the caption at the output size.

Rows (same captions and seeds):
  base          the model at home: base size, base frames, full attention
  full          4x base per side x 65 frames, full attention (RoPE extrapolated, no high-resolution training)
  atlas         the same size with AtlasVid, without LoRAs
  atlas_lora    AtlasVid with the model's stage-1 and stage-2 adapters (only when the folder ships them)
  ultragen      UltraGen mode (windows + compressed global branch)
  atlas_init    AtlasVid + --detail-init proxy
  atlas_lora_init
                AtlasVid with both adapters + --detail-init proxy at init strength 0.5: the README job's setting
  rt2, rt8      ablation of the proxy fps (temporal scale 2, 8; the default is 4)
  scale2        ablation of the proxy resolution (spatial scale 2: a proxy at twice the base size)
  atlas_lora_rt2, atlas_lora_rt8, atlas_lora_scale2
                the same ablations on row atlas_lora (the shipped adapters, trained at r_t 4 and the base-size
                proxy, used as they are: generate warns that the geometry differs)

Ceilings (no transformer): the ground-truth clip encoded and decoded by the model's own VAE, scored the same way;
no generated video can score above what its decoder can draw:
  vae           at the base size
  vae_out       at the model's default output size (the size of the 4x rows)

The proxy alone (stage 1 of the 4x rows, scored at its own size, the base size x 17 frames at fps / 4): the
layout every atlas row's detail stage reads, so no atlas row can keep one object where its proxy does not:
  proxy         with the model's stage-1 adapter
  proxy_plain   without it (the base model under the time-stretched RoPE)

Fewer forwards (issue 14), each on the row it names, with its quality cost against that row:
  base_cfg, atlas_lora_cfg        guidance only in the first half of the detail schedule (CFG truncation)
  base_reuse, atlas_lora_reuse    first-block cache (threshold --reuse, default 0.08)
  base_fewer, atlas_lora_fewer    both

    python benchmarks/bench_shapes_claim.py [--model shapes] [--rows base,full,atlas] [--captions 32] [--seeds 0]

Prints a table, writes benchmarks/results/shapes-claim.json (device, torch, commit, command, per-video scores) and a
PNG grid (rows: methods; columns: frames) of the first caption.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, environment, save  # noqa: E402

NO_ADAPTERS = {"lora_stage1": "none", "lora_stage2": "none"}
ROWS: dict[str, dict] = {
    "base": {"attention": "full", **NO_ADAPTERS},  # res/frames: the model's base size (filled in below)
    "full": {"attention": "full", **NO_ADAPTERS},
    "atlas": {"attention": "atlas", **NO_ADAPTERS},
    "atlas_lora": {"attention": "atlas"},
    "ultragen": {"attention": "ultragen", **NO_ADAPTERS},
    "atlas_init": {"attention": "atlas", "detail_init": "proxy", **NO_ADAPTERS},
    "atlas_lora_init": {"attention": "atlas", "detail_init": "proxy", "init_strength": 0.5},
}
ABLATIONS = {"rt2": {"temporal_scale": 2}, "rt8": {"temporal_scale": 8}, "scale2": {"spatial_scale": 2}}
ROWS.update({k: {"attention": "atlas", **opts, **NO_ADAPTERS} for k, opts in ABLATIONS.items()})
ROWS.update({f"atlas_lora_{k}": {"attention": "atlas", **opts} for k, opts in ABLATIONS.items()})
FEWER = {"cfg": {"detail_cfg_until": 0.5}, "reuse": {"detail_reuse": 0.08}}
FEWER["fewer"] = {**FEWER["cfg"], **FEWER["reuse"]}
ROWS.update({f"{row}_{k}": {**ROWS[row], **opts} for row in ("base", "atlas_lora") for k, opts in FEWER.items()})
NEEDS_ADAPTERS = {r for r in ROWS if r.startswith("atlas_lora")}
PROXIES = {"proxy": {"attention": "atlas"}, "proxy_plain": {"attention": "atlas", "lora_stage1": "none"}}
"""Rows that score the stage-1 proxy of the default-size job alone (no detail stage, not in the PNG grid)."""
NEEDS_ADAPTERS.add("proxy")
ROUND_TRIPS = ("vae", "vae_out")
"""Rows that score the VAE's reconstruction of the ground truth instead of a generated video."""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--rows", default="base,full,atlas,atlas_init,ultragen", help="comma list of the rows above")
    p.add_argument("--captions", type=int, default=32, help="captions used (evenly spread over the 32)")
    p.add_argument("--seeds", default="0", help="comma list of evaluation seeds")
    p.add_argument("--reuse", type=float, default=None, help="first-block cache threshold of the *_reuse/_fewer rows")
    p.add_argument("--name", default="shapes-claim", help="result file name (without .json)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args()
    unknown = sorted(set(args.rows.split(",")) - set(ROWS) - set(PROXIES) - set(ROUND_TRIPS))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {[*ROWS, *PROXIES, *ROUND_TRIPS]}")
    return args


def clips(captions: int, seeds: list[int]):
    from atlasvid_dist.world import all_scenes
    from atlasvid_dist.world.clips import WorldClip

    scenes = all_scenes()
    picks = sorted({round(i * len(scenes) / captions) for i in range(captions)})
    return [WorldClip(scenes[i], seed) for seed in seeds for i in picks]


def row_options(name: str, own: dict, reuse: float | None = None) -> dict:
    """The generate options of one row over the model's own defaults."""
    opts = dict(ROWS[name])
    if reuse is not None and "detail_reuse" in opts:
        opts["detail_reuse"] = reuse
    if name == "base" or name.startswith("base_"):
        opts.update(res=f"{own['base_width']}x{own['base_height']}", frames=own["base_frames"])
    return opts


def run_row(name: str, opts: dict, items, components, model: str, tmp: Path, proxy_only: bool = False):
    """Generate and score every clip with one row's options; returns scores, seconds and detail forwards (with the
    run's seconds by part) per video, the first video. ``proxy_only``: make and score only the proxy (stage 1,
    decoded at its own size and fps; no detail forwards)."""
    from atlasvid_dist.cli.generate import build_config
    from atlasvid_dist.eval import score_video
    from atlasvid_dist.pipeline.generate import TwoStageGenerator
    from atlasvid_dist.pipeline.video_io import read_mp4

    scores, seconds, forwards, first = [], [], [], None
    for k, clip in enumerate(items):
        out = tmp / f"{name}-{k}.mp4"
        values = {"model": model, "prompt": clip.scene.caption, "seed": clip.seed, "out": str(out), "crf": 0}
        cfg = build_config({**values, **opts})
        t0 = time.perf_counter()
        generator = TwoStageGenerator(cfg, components=components, progress=False)
        if proxy_only:
            generator.proxy_only(str(out))
            forwards.append({"total": 0, "reused": 0, "seconds": {}})
        else:
            result = generator.run()
            forwards.append({**result.detail_forwards, "seconds": dict(result.seconds)})
        seconds.append(time.perf_counter() - t0)
        frames = read_mp4(out)
        scores.append(score_video(frames, clip.scene.caption, name=f"{name}-{k}"))
        first = frames if first is None else first
        out.unlink()
    return scores, seconds, forwards, first


def round_trip_size(name: str, own: dict) -> tuple[int, int, int]:
    """(width, height, frames) of a VAE round-trip row: the base size or the model's default output size."""
    if name == "vae":
        return own["base_width"], own["base_height"], own["base_frames"]
    width, height = (int(v) for v in own["generate"]["res"].split("x"))
    return width, height, own["generate"]["frames"]


def run_round_trip(name: str, size: tuple[int, int, int], items, components):
    """Encode each clip's ground truth with the model's VAE (posterior mean), decode it the way generate does (tiled,
    blended) and score it; returns what run_row returns (no detail forwards)."""
    import torch

    from atlasvid_dist.eval import score_video
    from atlasvid_dist.pipeline.decode import DecodeTiling, decode_stream
    from atlasvid_dist.world.train import to_pixels

    vae, (width, height, frames) = components.vae, size
    scores, seconds, first = [], [], None
    for k, clip in enumerate(items):
        t0 = time.perf_counter()
        with torch.no_grad():
            pixels = to_pixels(clip.render(width, height, frames))[None]  # (1, 3, N, H, W)
            latents = vae.encode(pixels).latent_dist.mode()
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            video = np.concatenate(list(decode_stream(vae, (latents - mean) / std, DecodeTiling())))  # (N, H, W, 3)
        seconds.append(time.perf_counter() - t0)
        scores.append(score_video(video, clip.scene.caption, name=f"{name}-{k}"))
        first = video if first is None else first
    return scores, seconds, [{"total": 0, "reused": 0, "seconds": {}} for _ in items], first


def line(name: str, summary, seconds: float, forwards: float, detail: float) -> str:
    s = summary
    return (
        f"{name:<17} {s.all_correct:>6.0%} {s.one_object:>6.0%} {s.colour:>6.0%} {s.shape:>6.0%} "
        f"{s.direction:>6.0%} {s.mean_path_rms_px:>8.2f} {s.mean_psnr:>6.1f} {s.mean_ssim:>6.3f} {seconds:>8.1f} {detail:>8.1f} {forwards:>5.1f}"
    )


def main() -> None:
    args = parse()
    from atlasvid_dist.eval import summarise, write_grid
    from atlasvid_dist.models.loading import load_components, read_model_defaults

    own = read_model_defaults(args.model)
    if "base_width" not in own:
        raise SystemExit(f"{args.model}: no atlasvid_model.json with a base size (a shapes-world model is needed)")
    shipped = own.get("generate", {})
    has_adapters = bool(shipped.get("lora_stage1") and shipped.get("lora_stage2"))
    items = clips(args.captions, [int(s) for s in args.seeds.split(",")])
    components = load_components(args.model)
    header = (
        f"{'row':<17} {'all ok':>6} {'1 obj':>6} {'colour':>6} {'shape':>6} {'dir':>6} {'rms px':>8} "
        f"{'psnr':>6} {'ssim':>6} {'s/video':>8} {'detail s':>8} {'fwds':>5}"
    )
    print(f"{len(items)} videos per row, model {args.model}\n{header}", flush=True)
    results, grid_rows = {}, []
    with tempfile.TemporaryDirectory(prefix="shapes-claim-") as tmp:
        for name in args.rows.split(","):
            if name in NEEDS_ADAPTERS and not has_adapters:
                results[name] = {"skipped": "the model folder ships no stage-1/stage-2 adapters"}
                print(f"{name:<17} skipped: no adapters in {args.model}", flush=True)
                continue
            if name in ROUND_TRIPS:
                opts = dict(zip(("width", "height", "frames"), round_trip_size(name, own)))
                scores, seconds, forwards, first = run_round_trip(name, tuple(opts.values()), items, components)
            elif name in PROXIES:
                opts = dict(PROXIES[name])
                scores, seconds, forwards, first = run_row(
                    name, opts, items, components, args.model, Path(tmp), proxy_only=True
                )
            else:
                opts = row_options(name, own, args.reuse)
                scores, seconds, forwards, first = run_row(name, opts, items, components, args.model, Path(tmp))
            summary = summarise(scores)
            per_video = sum(seconds) / len(seconds)
            run_forwards = sum(f["total"] - f["reused"] for f in forwards) / len(forwards)
            detail = sum(f["seconds"].get("detail", 0.0) for f in forwards) / len(forwards)
            print(line(name, summary, per_video, run_forwards, detail), flush=True)
            results[name] = {
                "options": opts,
                "summary": asdict(summary),
                "seconds_per_video": per_video,
                "detail_forwards_run_per_video": run_forwards,
                "detail_seconds_per_video": detail,
                "detail_forwards": forwards,
                "videos": [asdict(s) for s in scores],
            }
            if name not in PROXIES:  # the grid's rows share the output size
                grid_rows.append(first)
    out_dir = Path(args.out) if args.out else RESULTS
    payload = {
        **environment("cpu"),
        "model": args.model,
        "model_defaults": shipped,
        "captions": [c.scene.caption for c in items],
        "seeds": [c.seed for c in items],
        "rows": results,
    }
    from atlasvid_dist.eval.report import jsonable

    path = save(args.name, jsonable(payload), args.out)
    if grid_rows:
        write_grid(out_dir / f"{args.name}.png", grid_rows)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
