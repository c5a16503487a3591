"""`atlasvid-dist demo`: the attention core at work on the built-in tiny Wan shapes (no downloads, CPU).

Runs the same latents through plain Wan full attention and through AtlasVid's windowed attention with a proxy,
and reports tokens, windows, attention FLOPs (from the cost model), time of each, and how far apart they are.
"""

from __future__ import annotations

import time

import torch
import typer

from ..config.method import AtlasConfig
from ..config.video import VideoSpec
from ..cost.attention import layer_attention_flops
from ..errors import check
from ..geometry.grid import ProxyGeometry, latent_grid, token_grid
from ..geometry.windows import WindowSpec

#: Most tokens the demo runs: it runs plain full attention over every token on the CPU (quadratic in time), and
#: allocates the latents before that. 1080P x 9 frames is 24,480 tokens; `plan` sizes anything larger.
DEMO_MAX_TOKENS = 32_768


def demo(
    res: str = typer.Option("480p", help="Resolution preset (480p|720p|1080p|2k|4k|8k) or WxH, pixels."),
    frames: int = typer.Option(9, help="Frames (4k+1)."),
    window: str = typer.Option("3,15,16", help="Window in tokens T,H,W."),
    spatial_scale: int = typer.Option(2, help="Detail tokens per proxy token (height, width)."),
    temporal_scale: int = typer.Option(4, help="r_t: proxy fps = fps / r_t."),
    pad_windows: bool = typer.Option(True, help="Pad windows that do not tile the grid."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run the attention core (full vs atlas) once on the tiny model and print what it did."""
    from ..models.atlas_transformer import AtlasTransformer
    from .common import parse_triple

    video = VideoSpec.from_res(res, frames=frames)
    _check_demo_size(video)
    cfg = AtlasConfig(
        mode="atlas",
        window=parse_triple("window", window),
        temporal_scale=temporal_scale,
        spatial_scale=spatial_scale,
        pad_windows=pad_windows,
    )
    lat = latent_grid(video.frames, video.gen_height, video.gen_width)
    grid = token_grid(lat)
    proxy = ProxyGeometry(grid, temporal_scale, spatial_scale).grid
    spec = WindowSpec(grid, cfg.window, pad=pad_windows)
    from ..models.tiny import build_tiny_transformer

    tr = build_tiny_transformer(seed)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, lat.t, lat.h, lat.w, generator=g)
    proxy_lat = torch.randn(1, 16, proxy.t, proxy.h * 2, proxy.w * 2, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    t = torch.tensor([900.0])
    typer.echo(
        f"video {video.width}x{video.height}x{video.frames} -> token grid {grid.dims} = {grid.size:,} tokens; "
        f"proxy {proxy.dims} = {proxy.size:,} tokens; {spec.num_windows} windows of {spec.window_tokens}"
    )
    results = {}
    for mode in ("full", "atlas"):
        model = AtlasTransformer(tr, AtlasConfig(**{**cfg.__dict__, "mode": mode}))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(latents, t, text, proxy=proxy_lat if mode == "atlas" else None)
        results[mode] = (out, time.perf_counter() - t0, layer_attention_flops(model.atlas_config, grid, 2, 12))
        typer.echo(f"{mode:5}: {results[mode][1]:.2f} s, attention {results[mode][2] / 1e9:.2f} GFLOP per layer")
    ratio = results["full"][2] / results["atlas"][2]
    diff = (results["full"][0] - results["atlas"][0]).abs().mean().item()
    typer.echo(f"atlas reads {ratio:.1f}x fewer attention FLOPs; mean |full - atlas| velocity difference {diff:.3f}")


def _check_demo_size(video: VideoSpec) -> None:
    """Refuse, by arithmetic before any tensor exists, a demo of more than DEMO_MAX_TOKENS tokens."""
    tokens = video.token_count_upper_bound()
    check(
        tokens <= DEMO_MAX_TOKENS,
        "res/frames",
        f"{video.width}x{video.height} x {video.frames} frames",
        f"{tokens:,} tokens; the demo runs full attention over all of them on the CPU and takes at most "
        f"{DEMO_MAX_TOKENS:,} (e.g. 1080p x 9 frames); use `atlasvid-dist plan` to size larger runs",
    )
