"""Stage 2 on one detail rank: the rank's own latent patches, denoised with window-sharded attention.

Latents are held per rank as a *strip*: the rank's patches (token order = its local order from the sharding)
laid side by side along width, (B, C, pt, ph, n * pw). The transformer's patch embedding (a convolution with
stride = kernel = patch) and its output head are per token, so ``AtlasTransformer.embed`` and ``head`` (with a
1 x 1 x n grid) run unchanged on a strip, and the scheduler's step is per element, so each rank steps its own
strip with its own scheduler (same timesteps) and the result is the rank's slice of the single-process run.

The stage itself (seed, proxy-init, guidance, denoising loop, checkpoint state) is ``pipeline/stages.py``'s
:class:`DetailStage`, the one the one-process run uses; this module gives it only the rank's token layout
(:class:`RankWindows`). Process-group free apart from the attention callback; the Ray actors (``actors.py``) call
:func:`denoise_rank`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..geometry.grid import Grid
from ..parallel import comm
from ..parallel.comm import CommStats
from ..parallel.window_attention import ProxyRows, ShardedWindowAttention, shard_for
from ..parallel.window_group import GroupedWindowAttention, group_layout
from ..pipeline.stages import DetailStage, ProxyInput, SavedStep, StageState
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
    window_order: str = "thw",
    shift_exchange: str = "kv",
) -> tuple[torch.Tensor, dict[int, int], dict[str, int]]:
    """Stage 2 of ``gen``'s config (a TwoStageGenerator: config, device, dtype) on rank ``rank`` of ``world``.

    ``ckpt`` (a StepCheckpointer of this rank) commits the rank's strip, scheduler state and stage-2 generator
    state after every step; ``resume_step`` continues from that committed step. ``on_step(done)`` runs after each
    commit. ``window_group`` > 1 shares every window of a group of that many ranks (``parallel/window_group.py``);
    then ``groups`` is (this rank's window group, its slot group) from ``new_groups`` and the rank holds its slice
    of its group's tokens. ``window_order`` is the ownership order of the window blocks (``parallel.sharding``),
    ``shift_exchange`` how shifted layers reach the tokens of straddling windows ('kv' or 'rows').
    Returns (own tokens (B, n, C, pt, ph, pw) in local order on CPU, bytes sent per layer,
    the stage's forwards: ``DetailStage.forwards``, the same on every rank).

    The stage (seed, proxy-init, CFG, proxy_mode 'joint' noise) is the one-process :class:`DetailStage`; only the
    token layout (:class:`RankWindows`) is this rank's.
    """
    check_supported(gen.cfg)
    stage = DetailStage(gen.cfg, comp, text, proxy, gen.device, gen.dtype, build_caches=False)
    split = None if window_group == 1 else (window_group, groups, window_parallel)
    stats = stats if stats is not None else CommStats()
    layout = RankWindows(stage, rank, world, group, stats, timeout, split, window_order, shift_exchange)
    state = stage.start(layout)
    if resume_step:
        state.restore(SavedStep(resume_step, *ckpt.load(resume_step)), gen.device, gen.dtype)

    def hook(s: StageState) -> None:
        if ckpt is not None:
            tensors, meta = s.checkpoint()
            ckpt.commit(s.step, tensors, meta)
        if on_step is not None:
            on_step(s.step)

    local = stage.denoise(state, layout, hook)  # (1, C, pt, ph, n*pw)
    return from_strip(local, stage.model.patch).cpu(), layout.bytes_per_layer(), stage.forwards(state)


def strip_forward(model, x: torch.Tensor, t, emb, attend, n: int, cache=None, move=None) -> torch.Tensor:
    """The velocity of a strip x (B, C, pt, ph, n*pw) of n tokens; ``attend`` does their self-attention;
    ``cache`` (a FirstBlockCache deciding over every rank) may skip the blocks after the first; ``move`` puts
    the rows in each layer's layout (shift exchange 'rows')."""
    tokens, temb, tproj, txt = model.embed(x, t, emb)
    out = model.run_blocks(tokens, txt, tproj, attend, cache=cache, move=move)
    return model.head(out, temb, Grid(1, 1, n), x.shape[0])  # (B, C, pt, ph, n*pw)


class RankWindows:
    """A rank's layout of stage 2: its windows' tokens (or with a window group its slice of the group's) as a
    strip, window-sharded attention reading the proxy keys/values.

    proxy_mode 'clean': the stage's cached keys/values are recorded keeping only the rows this rank's windows
    read (:class:`ProxyRows`, layer by layer: the whole proxy K/V never exists here), then one window attention
    per prompt kind reads them. 'joint': each forward records that call's proxy keys/values the same way
    (``AtlasTransformer.joint_proxy_kv``) and builds a window attention reading them.
    """

    def __init__(
        self,
        stage: DetailStage,
        rank: int,
        world: int,
        group,
        stats: CommStats,
        timeout,
        split=None,
        order="thw",
        exchange="kv",
    ):
        """``split``: (window group size, (window group, slot group), window_parallel) when windows are shared;
        ``order``: the ownership order of the window blocks; ``exchange``: how shifted layers reach the tokens of
        straddling windows ('kv': a halo of keys/values; 'rows': the residual rows move, one window group each)."""
        self.model, self.rank = stage.model, rank
        self.group, self.stats, self.timeout = group, stats, timeout
        grid = self.model.token_grid(torch.empty(stage.shape(), device="meta"))
        g = 1 if split is None else split[0]
        self.sharding = shard_for(stage.cfg.method, grid, world // g, order)
        self.group_layout = group_layout(self.sharding, rank, g) if g > 1 else None
        wsplit = None if split is None else (self.group_layout, split[1], split[2])
        if split is not None and exchange != "kv":
            raise ConfigError("shift_exchange", exchange, "a split window (window_group > 1) exchanges 'kv' only")
        self.exchange = exchange
        self.make = _window_attention(stage, grid, self.sharding, rank, group, stats, timeout, wsplit, exchange)
        self.keep = None
        if stage.proxy is not None:
            owner = rank if self.group_layout is None else self.group_layout.group
            pgrid = self.model.token_grid(stage.proxy, "proxy")
            scales = self.model.proxy_geometry(grid).scales
            self.keep = ProxyRows.of_rank(stage.cfg.method, grid, self.sharding, owner, pgrid, scales, exchange)
        stage.build_caches(self.keep)
        self.joint_bytes: dict[int, int] = {}
        self._first = None  # the first window attention built, whose geometry the later ones share
        self.attends = {}
        if not stage.joint:
            self.attends = {k: self._attention(stage.caches[k].kv if stage.caches else None) for k in stage.kinds}
        self.n = None

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, f, h, w) -> this rank's tokens as a strip (1, C, pt, ph, n*pw)."""
        mine = _own_tokens(self.sharding, self.group_layout, self.rank, to_tokens(latents, self.model.patch))
        self.n = mine.shape[1]  # mine: (1, n, C, pt, ph, pw)
        return to_strip(mine)

    def forward(self, kind: str, x, t, emb, proxy: ProxyInput | None, cache=None) -> torch.Tensor:
        attend = self.attends.get(kind)
        joint = proxy is not None and proxy.cache is None
        if joint:  # recorded with only this rank's windows' proxy rows
            attend = self._attention(self.model.joint_proxy_kv(proxy.proxy.to(x.dtype), proxy.noise, t, emb, self.keep))
        move = attend.move if self.exchange == "rows" else None
        out = strip_forward(self.model, x, t, emb, attend, self.n, cache, move)
        if joint:
            _add_bytes(self.joint_bytes, attend.layer_bytes)
        return out

    def _attention(self, kv):
        """The window attention reading proxy keys/values ``kv`` (a prompt kind's cache, or with proxy_mode 'joint'
        this forward's); a rank that owns whole windows builds its geometry (RoPE tables, halo plans, window rows)
        once and shares it between kinds and forwards (a window group builds a new one)."""
        if self.group_layout is not None:
            return self.make(kv)
        if self._first is None:
            self._first = self.make(kv)
            return self._first
        return self._first.reading(kv)

    def all_sum(self, sums: torch.Tensor) -> torch.Tensor:
        """The first-block cache's decision sums added over every rank (each holds a disjoint share)."""
        return comm.all_sum(sums, self.group, stats=self.stats, category="reuse_decision", timeout=self.timeout)

    def bytes_per_layer(self) -> dict[int, int]:
        """Bytes this rank sent per layer so far, over every forward."""
        total = dict(self.joint_bytes)
        for a in self.attends.values():
            _add_bytes(total, a.layer_bytes)
        return total


def _add_bytes(total: dict[int, int], layer_bytes: dict[int, int]) -> None:
    for layer, b in layer_bytes.items():
        total[layer] = total.get(layer, 0) + b


def _own_tokens(sharding, layout, rank: int, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's tokens (B, n, ...) of all tokens (B, N, ...) in raster order: its windows' tokens in local
    order, or with a window group its slice of the group's."""
    if layout is None:
        return sharding.shard(tokens, rank)
    return sharding.shard(tokens, layout.group)[:, layout.start : layout.start + layout.count]


def _window_attention(stage: DetailStage, grid, sharding, rank, group, stats, timeout, split=None, exchange="kv"):
    """``make(proxy_kv)``: this rank's window attention reading ``proxy_kv`` (None: no proxy); ``split`` =
    (layout, (window group, slot group), window_parallel) when windows are shared by a group; ``exchange``: how
    shifted layers reach the tokens of straddling windows."""
    cfg, comp, model, device = stage.cfg, stage.comp, stage.model, stage.device
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
                device,
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
            cfg.method, grid, model.rotary, sharding, rank, device, kv, scales, layers, group, stats, timeout, exchange
        )

    return make
