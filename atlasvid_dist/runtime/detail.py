"""Stage 2 on one detail rank: the rank's own latent patches, denoised with window-sharded attention.

Latents are held per rank as a *strip*: the rank's patches (token order = its local order from the sharding)
laid side by side along width, (B, C, pt, ph, n * pw). The transformer's patch embedding (a convolution with
stride = kernel = patch) and its output head are per token, so ``AtlasTransformer.embed`` and ``head`` (with a
1 x 1 x n grid) run unchanged on a strip, and the scheduler's step is per element, so each rank steps its own
strip with its own scheduler (same timesteps) and the result is the rank's slice of the single-process run.

Process-group free apart from the attention callback; the Ray actors (``actors.py``) call :func:`denoise_rank`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..geometry.grid import Grid
from ..parallel.comm import CommStats
from ..parallel.window_attention import ShardedWindowAttention, shard_for
from ..parallel.window_group import GroupedWindowAttention, group_layout
from ..pipeline import sampling
from ..pipeline.checkpoint import generator_state, restore_generator
from ..pipeline.text import TextEmbeddings


# -- latent layout ------------------------------------------------------------------------------------------------
def to_tokens(latents: torch.Tensor, patch) -> torch.Tensor:
    """(B, C, t*pt, h*ph, w*pw) -> (B, N, C, pt, ph, pw), tokens in raster order."""
    b, c, f, hh, ww = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, f // pt, pt, hh // ph, ph, ww // pw, pw)  # (B, C, t, pt, h, ph, w, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(1, 3)  # (B, N, C, pt, ph, pw)


def from_tokens(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: (B, N, C, pt, ph, pw) raster order -> (B, C, t*pt, h*ph, w*pw)."""
    b, _, c, pt, ph, pw = tokens.shape
    x = tokens.reshape(b, grid.t, grid.h, grid.w, c, pt, ph, pw)  # (B, t, h, w, C, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, grid.t * pt, grid.h * ph, grid.w * pw)


def to_strip(tokens: torch.Tensor) -> torch.Tensor:
    """(B, n, C, pt, ph, pw) -> (B, C, pt, ph, n*pw): a latent of a 1 x 1 x n token grid."""
    return tokens.permute(0, 2, 3, 4, 1, 5).flatten(4, 5)


def from_strip(strip: torch.Tensor, patch) -> torch.Tensor:
    """Inverse of :func:`to_strip`: (B, C, pt, ph, n*pw) -> (B, n, C, pt, ph, pw)."""
    b, c, pt, ph, npw = strip.shape
    pw = patch[2]
    return strip.reshape(b, c, pt, ph, npw // pw, pw).permute(0, 4, 1, 2, 3, 5)


# -- the stage --------------------------------------------------------------------------------------------------------
def check_supported(cfg) -> None:
    """Refuse what the window-sharded stage 2 does not run (before any actor starts)."""
    m = cfg.method
    if m.mode != "atlas":
        raise ConfigError("attention", m.mode, "the distributed runtime runs 'atlas' only (windows shard by rank)")


def denoise_rank(
    gen,
    comp,
    text: TextEmbeddings,
    proxy: torch.Tensor | None,
    rank: int,
    world: int,
    group=None,
    stats: CommStats | None = None,
    timeout: float | None = None,
    on_step: Callable[[int], None] | None = None,
    ckpt=None,
    resume_step: int | None = None,
    window_group: int = 1,
    groups=None,
    window_parallel: str = "ulysses",
) -> tuple[torch.Tensor, dict[int, int]]:
    """Stage 2 of ``gen`` (a TwoStageGenerator, for its config and stage helpers) on rank ``rank`` of ``world``.

    ``ckpt`` (a StepCheckpointer of this rank) commits the rank's strip, scheduler state and stage-2 generator
    state after every step; ``resume_step`` continues from that committed step. ``on_step(done)`` runs after each
    commit. ``window_group`` > 1 shares every window of a group of that many ranks (``parallel/window_group.py``);
    then ``groups`` is (this rank's window group, its slot group) from ``new_groups`` and the rank holds its slice
    of its group's tokens. Returns (own tokens (B, n, C, pt, ph, pw) in local order on CPU, bytes sent per layer).

    proxy_mode 'joint': like the one-process stage 2, the rank keeps the stage-2 generator (seed + 1) that drew
    the initial noise and draws each forward's proxy noise from it (cond, then uncond), builds that call's proxy
    keys/values (``AtlasTransformer.joint_proxy_kv``, the whole proxy on every rank) and a window attention reading
    them.
    """
    cfg = gen.cfg
    check_supported(cfg)
    model = gen._atlas(comp, cfg.method)
    device, dtype = gen.device, gen.dtype
    shape = (1, comp.transformer.config.in_channels, *cfg.latent.dims)
    grid = model.token_grid(torch.empty(shape, device="meta"))
    sharding = shard_for(cfg.method, grid, world // window_group)
    layout = group_layout(sharding, rank, window_group) if window_group > 1 else None
    stats = stats if stats is not None else CommStats()
    split = None if layout is None else (layout, groups, window_parallel)
    window_attention = _window_attention(gen, comp, model, grid, sharding, rank, group, stats, timeout, split)
    joint = proxy is not None and cfg.method.proxy_mode == "joint"
    attends = {} if joint else _clean_attends(gen, model, text, proxy, window_attention)
    gen._adapter("stage2")
    rng = torch.Generator().manual_seed(cfg.seed + 1)  # the one-process stage 2's generator, state for state
    noise = torch.randn(shape, generator=rng).to(device, dtype)
    scfg = sampling.SamplerConfig(cfg.steps, cfg.guidance, cfg.flow_shift)
    start = 0
    if cfg.detail_init == "proxy":
        start, noise = gen._proxy_init(proxy, noise, sampling.start_scheduler(comp.scheduler, scfg, device), scfg)
    mine = _own_tokens(sharding, layout, rank, to_tokens(noise, model.patch))  # (B, n, C, pt, ph, pw)
    local = to_strip(mine)  # (B, C, pt, ph, n*pw)
    n = mine.shape[1]
    per_layer: dict[int, int] = {}

    def forward(kind):
        emb = getattr(text, kind)

        def f(x, t):
            attend = attends.get(kind)
            if joint:  # the attention keeps only its windows' proxy rows: the whole K/V is freed here
                proxy_noise = torch.randn(proxy.shape, generator=rng).to(x)
                attend = window_attention(model.joint_proxy_kv(proxy.to(x.dtype), proxy_noise, t, emb))
            tokens, temb, tproj, txt = model.embed(x, t, emb)
            out = model.run_blocks(tokens, txt, tproj, attend)
            if joint:
                _add_bytes(per_layer, attend.layer_bytes)
            return model.head(out, temb, Grid(1, 1, n), x.shape[0])  # (B, C, pt, ph, n*pw)

        return f

    velocity = sampling.guided(forward("cond"), forward("uncond") if text.uncond is not None else None, cfg.guidance)
    sched = sampling.start_scheduler(comp.scheduler, scfg, device)
    if start and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    if resume_step:
        local, start = _resume(ckpt, resume_step, sched, rng, device, dtype)

    def hook(done, lat, s):
        if ckpt is not None:
            tensors, meta = sampling.scheduler_state(s)
            tensors = {**tensors, "latents": lat.detach().cpu().clone(), "rng": generator_state(rng)}
            ckpt.commit(done, tensors, {"step": done, "sched": meta})
        if on_step is not None:
            on_step(done)

    with torch.no_grad():
        local = sampling.denoise(velocity, local, sched, scfg.steps, start=start, on_step=hook)
    for a in attends.values():
        _add_bytes(per_layer, a.layer_bytes)
    return from_strip(local, model.patch).cpu(), per_layer


def _resume(ckpt, step: int, sched, rng: torch.Generator, device, dtype) -> tuple[torch.Tensor, int]:
    """(strip, next step) of the rank's committed ``step``; restores the scheduler and the stage-2 generator (a
    checkpoint written before ranks saved it has none: only proxy_mode 'joint' draws from it, and the distributed
    runtime ran only 'clean' then)."""
    tensors, meta = ckpt.load(step)
    sampling.restore_scheduler(sched, {k: v for k, v in tensors.items() if k.startswith("sched.")}, meta["sched"])
    if "rng" in tensors:
        restore_generator(rng, tensors["rng"])
    return tensors["latents"].to(device, dtype), step


def _add_bytes(total: dict[int, int], layer_bytes: dict[int, int]) -> None:
    for layer, b in layer_bytes.items():
        total[layer] = total.get(layer, 0) + b


def _own_tokens(sharding, layout, rank: int, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's tokens (B, n, ...) of all tokens (B, N, ...) in raster order: its windows' tokens in local
    order, or with a window group its slice of the group's."""
    if layout is None:
        return sharding.shard(tokens, rank)
    return sharding.shard(tokens, layout.group)[:, layout.start : layout.start + layout.count]


def _clean_attends(gen, model, text, proxy, window_attention) -> dict:
    """One window attention per text embedding (cond / uncond: their proxy keys differ), reading the clean proxy's
    cached keys/values (none without a proxy)."""
    # the proxy path is the stage-1 model: the one function the one-process run and training use
    caches = {} if proxy is None else gen.proxy_caches(model, proxy.to(gen.device, gen.dtype), text)
    kinds = [k for k in ("cond", "uncond") if getattr(text, k) is not None]
    return {k: window_attention(caches[k].kv if caches else None) for k in kinds}


def _window_attention(gen, comp, model, grid, sharding, rank, group, stats, timeout, split=None):
    """``make(proxy_kv)``: this rank's window attention reading ``proxy_kv`` (None: no proxy); ``split`` =
    (layout, (window group, slot group), window_parallel) when windows are shared by a group."""
    cfg = gen.cfg
    layers = len(comp.transformer.blocks)

    def make(kv):
        scales = model.proxy_geometry(grid).scales if kv is not None else (1.0, 1.0, 1.0)
        if split is not None:
            layout, (wgroup, slot), window_parallel = split
            heads = comp.transformer.config.num_attention_heads
            return GroupedWindowAttention(
                cfg.method,
                grid,
                model.rotary,
                sharding,
                layout,
                heads,
                gen.device,
                kv,
                scales,
                layers,
                wgroup,
                slot,
                stats,
                timeout,
                window_parallel,
            )
        return ShardedWindowAttention(
            cfg.method, grid, model.rotary, sharding, rank, gen.device, kv, scales, layers, group, stats, timeout
        )

    return make
