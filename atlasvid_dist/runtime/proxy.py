"""Stage 1 (the proxy) over all ranks of a group with sequence parallelism (``--proxy-parallel ulysses|ring``).

Every rank owns an equal, contiguous slice of the proxy tokens (raster order) and keeps it as a *strip* (see
``detail.py``): patch embedding, the blocks' per-token layers and the output head run on the slice alone. Only
self-attention needs the whole sequence; it is full attention (stage 1 has no windows), done either by

* ``ulysses``: an all-to-all turns the sequence slices into head slices, each rank attends over every token for
  heads / world heads, and a second all-to-all turns them back (heads must divide by the group size); or
* ``ring``: keys/values travel round the ring and each rank merges the partial results by log-sum-exp.

Queries and keys are rotated with the stage-1 RoPE rows of the rank's own tokens (time scaled by r_t) before
either. Every rank steps its own slice with its own scheduler (same timesteps; the scheduler step is per element)
from its slice of the same seeded noise (it runs ``pipeline/stages.py``'s :class:`ProxyStage`, the one-process stage 1,
given the rank's layout :class:`ProxySlice`), so the result is the one-process stage 1. At the end the slices are
all-gathered: every rank holds the clean proxy (stage 2 reads it on every rank). Bytes are counted in a CommStats
(``ulysses.*`` / ``ring.*`` and ``proxy.gather``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config.parallel import RUNTIME_PROXY_PARALLEL, check_proxy_split
from ..geometry.grid import Grid
from ..models.rope import apply_rotary
from ..parallel import comm
from ..parallel.ring import ring_attention
from ..parallel.ulysses import ulysses_attention
from ..pipeline.stages import ProxyStage
from ..pipeline.text import TextEmbeddings
from .detail import from_strip, from_tokens, strip_forward, to_strip, to_tokens

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
    """Stage 1 of ``gen``'s config (a TwoStageGenerator) on rank ``rank`` of ``world``; returns the whole clean
    proxy latent (1, C, f, h, w) on every rank."""
    stage = ProxyStage(gen.cfg, comp, text, gen.device, gen.dtype)
    stats = stats if stats is not None else comm.CommStats()
    layout = ProxySlice(stage, rank, world, mode, group, stats, timeout)
    state = stage.start(layout)
    local = stage.denoise(state, layout)  # (1, C, pt, ph, n*pw)
    return _gather(from_strip(local, stage.model.patch), layout.grid, group, stats, timeout)


class ProxySlice:
    """A rank's layout of stage 1: its contiguous slice of the proxy tokens (raster order) as a strip, full
    attention over the group's whole sequence (Ulysses or ring)."""

    def __init__(self, stage: ProxyStage, rank: int, world: int, mode: str, group, stats, timeout):
        model = self.model = stage.model
        self.grid = model.token_grid(torch.empty(stage.shape(), device="meta"), "proxy latents")
        check_proxy_split(self.grid.size, stage.comp.transformer.config.num_attention_heads, world, mode)
        self.n = self.grid.size // world
        self.mine = slice(rank * self.n, (rank + 1) * self.n)
        self.attend = _attend(model, self.grid, self.mine, mode, group, stats, timeout, stage.device)

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, f, h, w) -> this rank's slice as a strip (1, C, pt, ph, n*pw)."""
        return to_strip(to_tokens(latents, self.model.patch)[:, self.mine])

    def forward(self, kind: str, x, t, emb, proxy=None, cache=None) -> torch.Tensor:
        return strip_forward(self.model, x, t, emb, self.attend, self.n, cache)


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
