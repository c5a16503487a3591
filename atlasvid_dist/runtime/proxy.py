"""Stage 1 (the proxy) over all ranks of a group with sequence parallelism (``--proxy-parallel ulysses|ring``).

Every rank owns an equal, contiguous slice of the proxy tokens (raster order) and keeps it as a *strip* (see
``detail.py``): patch embedding, the blocks' per-token layers and the output head run on the slice alone. Only
self-attention needs the whole sequence; it is full attention (stage 1 has no windows), done either by

* ``ulysses``: an all-to-all turns the sequence slices into head slices, each rank attends over every token for
  heads / world heads, and a second all-to-all turns them back (heads must divide by the group size); or
* ``ring``: keys/values travel round the ring and each rank merges the partial results by log-sum-exp.

Queries and keys are rotated with the stage-1 RoPE rows of the rank's own tokens (time scaled by r_t) before
either. Every rank steps its own slice with its own scheduler (same timesteps; the scheduler step is per element)
from its slice of the same seeded noise, so the result is the one-process stage 1. At the end the slices are
all-gathered: every rank holds the clean proxy (stage 2 reads it on every rank). Bytes are counted in a CommStats
(``ulysses.*`` / ``ring.*`` and ``proxy.gather``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config.method import AtlasConfig
from ..config.parallel import RUNTIME_PROXY_PARALLEL, check_proxy_split
from ..geometry.grid import Grid
from ..models.rope import apply_rotary
from ..parallel import comm
from ..parallel.ring import ring_attention
from ..parallel.ulysses import ulysses_attention
from ..pipeline import sampling
from ..pipeline.text import TextEmbeddings
from .detail import from_strip, from_tokens, to_strip, to_tokens

MODES = RUNTIME_PROXY_PARALLEL
# check_proxy_split: the one check of a proxy's split, in config/parallel.py (the driver's pre-flight uses it too)


def denoise_proxy_rank(
    gen,
    comp,
    text: TextEmbeddings,
    rank: int,
    world: int,
    mode: str,
    group: dist.ProcessGroup | None = None,
    stats: comm.CommStats | None = None,
    timeout: float | None = None,
) -> torch.Tensor:
    """Stage 1 of ``gen`` (a TwoStageGenerator) on rank ``rank`` of ``world``; returns the whole clean proxy
    latent (1, C, f, h, w) on every rank."""
    cfg = gen.cfg
    gen._adapter("stage1")
    model = gen._atlas(comp, AtlasConfig(**{**cfg.method.__dict__, "mode": "full"}))
    device, dtype = gen.device, gen.dtype
    shape = (1, comp.transformer.config.in_channels, *gen._proxy_latent_dims())
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device, dtype)  # as stage1
    grid = model.token_grid(noise, "proxy latents")
    heads = comp.transformer.config.num_attention_heads
    check_proxy_split(grid.size, heads, world, mode)
    n = grid.size // world
    mine = slice(rank * n, (rank + 1) * n)
    local = to_strip(to_tokens(noise, model.patch)[:, mine])  # (1, C, pt, ph, n*pw)
    stats = stats if stats is not None else comm.CommStats()
    attend = _attend(model, grid, mine, mode, group, stats, timeout, device)

    def forward(emb):
        def f(x, t):
            tokens, temb, tproj, txt = model.embed(x, t, emb)
            out = model.run_blocks(tokens, txt, tproj, attend)
            return model.head(out, temb, Grid(1, 1, n), x.shape[0])  # (B, C, pt, ph, n*pw)

        return f

    scfg = sampling.SamplerConfig(cfg.proxy_steps, cfg.guidance, cfg.proxy_flow_shift)
    velocity = sampling.guided(
        forward(text.cond), forward(text.uncond) if text.uncond is not None else None, cfg.guidance
    )
    sched = sampling.start_scheduler(comp.scheduler, scfg, device)
    with torch.no_grad():
        local = sampling.denoise(velocity, local, sched, scfg.steps)
    return _gather(from_strip(local, model.patch), grid, group, stats, timeout)


def _attend(model, grid: Grid, mine: slice, mode: str, group, stats, timeout, device):
    """Full attention of this rank's proxy tokens over the group's whole sequence, stage-1 RoPE applied first."""
    tables = model.proxy_rotary(grid).index(torch.arange(grid.size)[mine]).to(device)
    attention = ulysses_attention if mode == "ulysses" else ring_attention

    def attend(layer, q, k, v):  # (B, n, H, D) each, un-rotated
        qr, kr = apply_rotary(q, tables), apply_rotary(k, tables)
        qh, kh, vh = (t.transpose(1, 2) for t in (qr, kr, v.to(qr.dtype)))  # (B, H, n, D)
        out = attention(
            qh.contiguous(),
            kh.contiguous(),
            vh.contiguous(),
            group,
            stats,
            step=f"proxy layer {layer}",
            timeout=timeout,
        )
        return out.transpose(1, 2)  # (B, n, H, D)

    return attend


def _gather(tokens: torch.Tensor, grid: Grid, group, stats, timeout) -> torch.Tensor:
    """Every rank's slice (B, n, C, pt, ph, pw) -> the whole proxy latent (B, C, f, h, w) on every rank."""
    world = comm.group_size(group)
    parts = [torch.empty_like(tokens) for _ in range(world)]
    work = dist.all_gather(parts, tokens.contiguous(), group=group, async_op=True)
    comm.wait(work, group, "proxy all-gather", "all_gather of the proxy slices", timeout)
    stats.add("proxy.gather", comm.nbytes(tokens) * (world - 1), messages=world - 1)
    return from_tokens(torch.cat(parts, dim=1), grid)  # slices are contiguous in raster order
