"""AtlasTransformer: a diffusers WanTransformer3DModel run as AtlasVid's joint proxy + detail forward.

The wrapper owns no weights: it registers the given transformer as a submodule and calls its layers (patch
embedding, condition embedder, each block's norms / projections / cross-attention / FFN, the output head), so
LoRA adapters loaded into the transformer apply here too. Only the self-attention is done differently, by
:class:`~atlasvid_dist.models.attention.detail.DetailAttention` (full / atlas / ultragen).

Proxy path (asymmetric attention): proxy queries attend only proxy keys, with the stage-1 positions (time x r_t),
exactly as the stage-1 model; its per-layer keys (rotated at detail coordinates given by
:class:`~atlasvid_dist.geometry.grid.ProxyAnchor`: time j * r_t, space i * s + (s - 1) / 2, the centre of the
detail block a proxy token covers) and values are what detail windows read. A clean proxy (timestep 0) does not change across
denoising steps, so its keys/values are computed once and cached (see :meth:`AtlasTransformer.build_proxy_cache`);
the automatic cache is keyed on the proxy and text tensors and on the transformer's weights and adapters
(:func:`weights_key`), so editing a weight in place or switching a LoRA adapter rebuilds it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..config.method import AtlasConfig
from ..errors import ConfigError, InputError
from ..geometry.grid import Grid, ProxyAnchor, ProxyGeometry
from .attention.detail import AttentionGeometry, DetailAttention, ProxyKV
from .attention.kernels import reference_attention, sdpa
from .block_cache import FirstBlockCache
from .rope import Rotary3D, RotaryTables, apply_rotary

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Move = Callable[["int | None", "int | None", torch.Tensor], torch.Tensor]
"""``move(frm, to, x)``: rows x (B, n, D) laid out for layer ``frm`` -> laid out for layer ``to`` (None: the layout
the forward was given)."""
KeepRows = Callable[[int], "torch.Tensor | None"]
"""``keep(layer)``: the proxy raster ids whose keys/values a recording keeps in that layer (None: all of them)."""


@dataclass
class ProxyCache:
    """Cached per-layer proxy keys/values for one (proxy latent, text embedding) pair.

    ``matches`` compares the tensors exactly (shape, dtype, device, values), so a cache is never reused for a
    different proxy or prompt; ``weights`` (see :func:`weights_key`) records the weights and adapters it was
    built with.
    """

    kv: ProxyKV
    proxy: torch.Tensor
    text: torch.Tensor
    weights: tuple | None = None

    def matches(self, proxy: torch.Tensor, text: torch.Tensor) -> bool:
        return all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in ((self.proxy, proxy), (self.text, text))
        )


def weights_key(module: nn.Module) -> tuple:
    """Changes whenever the module's weights or active adapters may have changed.

    Per parameter and buffer: identity, storage address and autograd version counter (bumped by every in-place
    write: ``copy_`` in ``load_state_dict``, optimizer steps, ``with no_grad(): p.add_(...)``); plus every peft
    tuner layer's active adapters, enabled flag and scalings. Writes through ``p.data`` bypass the version
    counter (as they bypass autograd) and are not seen.
    """
    tensors = tuple((id(t), t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))
    adapters = []
    for m in module.modules():
        active = getattr(m, "active_adapters", None)
        if active is not None and hasattr(m, "disable_adapters") and not callable(active):
            scaling = getattr(m, "scaling", {})
            adapters.append(
                (
                    tuple(active),
                    bool(m.disable_adapters),
                    tuple(sorted(scaling.items())) if isinstance(scaling, dict) else (),
                )
            )
    return tensors, tuple(adapters)


class AtlasTransformer(nn.Module):
    """Joint proxy + detail forward over a diffusers ``WanTransformer3DModel`` (weights shared, not copied).

    ``model(latents, timestep, encoder_hidden_states, proxy=proxy_latents)`` returns the detail velocity, shaped
    like ``latents`` (B, C, f, h, w). ``proxy`` is the clean proxy latent (B or 1, C, f_p, h/s, w/s).

    It also stands in for the transformer of a diffusers ``WanPipeline``: ``config`` is the wrapped transformer's
    (diffusers reads ``in_channels``, ``patch_size``), ``dtype``/``device``/``cache_context`` are the transformer's,
    and ``forward`` takes diffusers' keywords (``hidden_states=``, ``attention_kwargs=``, ``return_dict=``). The
    method's settings are :attr:`atlas_config`.
    """

    def __init__(
        self,
        transformer: nn.Module,
        config: AtlasConfig | None = None,
        ffn_chunk: int = 0,
        compile_blocks: bool = False,
    ):
        """``ffn_chunk`` > 0: every block's feed-forward runs over chunks of that many tokens (same result, its
        (tokens x ffn_dim) activations bounded). ``compile_blocks``: the blocks' non-attention code (:class:`BlockOps`)
        runs through torch.compile."""
        super().__init__()
        self.ffn_chunk = int(ffn_chunk)
        self.ops = BlockOps.of(compile_blocks)
        _check_transformer(transformer)
        self.transformer = transformer
        self.atlas_config = config if config is not None else AtlasConfig()
        cfg = transformer.config
        self.patch = tuple(int(p) for p in cfg.patch_size)
        self.heads = int(cfg.num_attention_heads)
        self.rotary = Rotary3D(int(cfg.attention_head_dim))
        self._proxy_cache: ProxyCache | None = None
        self._geometry: AttentionGeometry | None = None  # the detail attention's, kept across forwards
        self._proxy_tables: dict[tuple, RotaryTables] = {}  # the proxy path's RoPE tables, kept across forwards

    # ------------------------------------------------------------------------------ diffusers model interface
    @property
    def config(self):
        """The wrapped transformer's diffusers config (what WanPipeline reads); the method's is ``atlas_config``."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def cache_context(self, name: str, **kwargs):
        """The wrapped transformer's cache context (diffusers' pipelines enter it around each call)."""
        if hasattr(self.transformer, "cache_context"):
            return self.transformer.cache_context(name, **kwargs)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------------- public API
    def forward(
        self,
        latents: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        proxy: torch.Tensor | None = None,
        *,
        proxy_cache: ProxyCache | None = None,
        proxy_noise: torch.Tensor | None = None,
        block_cache: FirstBlockCache | None = None,
        hidden_states: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool | None = None,
    ):
        """Detail velocity (B, C, f, h, w). See the class docstring; ``proxy_noise`` is used in 'joint' mode;
        ``block_cache`` (this prompt's :class:`FirstBlockCache`) may skip the blocks after the first.

        ``hidden_states`` is diffusers' name for ``latents``; with ``return_dict`` given (as diffusers' pipelines
        do) the result is wrapped as a diffusers transformer returns it: ``(velocity,)`` or an output object.
        """
        latents = _diffusers_latents(latents, hidden_states, timestep, encoder_hidden_states, attention_kwargs)
        out = self._detail(latents, timestep, encoder_hidden_states, proxy, proxy_cache, proxy_noise, block_cache)
        if return_dict is None:
            return out
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _detail(
        self, latents, timestep, encoder_hidden_states, proxy, proxy_cache, proxy_noise, block_cache=None
    ) -> torch.Tensor:
        grid = self.token_grid(latents, "latents")
        timestep = self._check_inputs(latents, timestep, encoder_hidden_states)
        proxy_kv = None
        if proxy is not None or proxy_cache is not None:
            proxy_kv = self._proxy_kv(latents, timestep, encoder_hidden_states, proxy, proxy_cache, proxy_noise)
        scales = self.proxy_geometry(grid).scales if proxy_kv is not None else (1.0, 1.0, 1.0)
        geometry = self._attention_geometry(grid, latents.device, None if proxy_kv is None else proxy_kv.grid, scales)
        attend = DetailAttention(self.atlas_config, grid, self.rotary, latents.device, proxy_kv, scales, geometry)
        return self._run(latents, timestep, encoder_hidden_states, grid, attend, block_cache=block_cache)

    def _attention_geometry(self, grid: Grid, device, proxy_grid: Grid | None, scales) -> AttentionGeometry:
        """The detail attention's geometry (RoPE tables, window indices) on ``device``: built by the first forward
        on this grid and kept for the next ones (the last one only: another grid replaces it)."""
        key = AttentionGeometry.key_of(self.atlas_config, grid, device, proxy_grid, scales)
        if self._geometry is None or self._geometry.key() != key:
            self._geometry = AttentionGeometry(self.atlas_config, grid, self.rotary, device, proxy_grid, scales)
        return self._geometry

    def proxy_forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """Stage 1: the proxy's velocity with full attention and temporally scaled RoPE (time x r_t)."""
        grid = self.token_grid(latents, "proxy latents")
        timestep = self._check_inputs(latents, timestep, encoder_hidden_states)
        attend, _ = self._proxy_attend(grid, latents.device, record=False)
        return self._run(latents, timestep, encoder_hidden_states, grid, attend)

    def build_proxy_cache(
        self, proxy: torch.Tensor, encoder_hidden_states: torch.Tensor, keep: KeepRows | None = None
    ) -> ProxyCache:
        """Run the clean proxy (timestep 0) through every layer once and keep each layer's keys/values (with
        ``keep``, only its rows of each layer, selected as the layer is recorded: the whole K/V never exists)."""
        grid = self.token_grid(proxy, "proxy")
        b = max(proxy.shape[0], encoder_hidden_states.shape[0])
        t0 = torch.zeros(b, device=proxy.device)
        proxy_b = proxy.expand(b, *proxy.shape[1:])
        self._check_inputs(proxy_b, t0, encoder_hidden_states)
        weights = weights_key(self.transformer)
        kv = self._record_proxy(proxy_b, t0, encoder_hidden_states, grid, keep)
        return ProxyCache(kv, proxy.detach().clone(), encoder_hidden_states.detach().clone(), weights)

    def joint_proxy_kv(
        self,
        proxy: torch.Tensor,
        noise: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        keep: KeepRows | None = None,
    ) -> ProxyKV:
        """The proxy keys/values of ``proxy_mode='joint'`` at one detail step (what ``forward`` reads then).

        The proxy is re-noised to the step's level on the flow line, sigma = timestep / 1000:
        ``(1 - sigma) * proxy + sigma * noise`` (in the proxy's dtype), and run through every layer at that
        timestep. ``proxy`` and ``noise`` are (B or 1, C, f_p, h_p, w_p), B the text's batch; ``timestep`` a
        scalar or (B,). Runtimes that shard the detail tokens build it once per call, keeping each layer's rows
        their windows read (``keep``), and pass it to their window attention.
        """
        b = encoder_hidden_states.shape[0]
        grid = self.token_grid(proxy, "proxy")
        if noise.shape[1:] != proxy.shape[1:] or noise.shape[0] not in (1, b) or proxy.shape[0] not in (1, b):
            raise InputError(
                f"proxy_noise: expected the proxy's shape (B or 1, {', '.join(map(str, proxy.shape[1:]))})"
                f" with B = {b}; got proxy {tuple(proxy.shape)}, noise {tuple(noise.shape)}"
            )
        timestep = self._check_inputs(proxy.expand(b, *proxy.shape[1:]), timestep, encoder_hidden_states)
        sigma = (timestep.float() / 1000.0).reshape(b, 1, 1, 1, 1)
        noisy = ((1.0 - sigma) * proxy + sigma * noise).to(proxy.dtype)
        return self._record_proxy(noisy, timestep, encoder_hidden_states, grid, keep)

    def clear_proxy_cache(self) -> None:
        self._proxy_cache = None

    def proxy_geometry(self, detail: Grid) -> ProxyGeometry:
        return ProxyGeometry(detail, self.atlas_config.temporal_scale, self.atlas_config.spatial_scale)

    def token_grid(self, latents: torch.Tensor, name: str = "latents") -> Grid:
        if latents.ndim != 5:
            raise InputError(f"{name}: expected (B, C, f, h, w), got shape {tuple(latents.shape)}")
        dims = latents.shape[2:]
        for ax, (n, p) in enumerate(zip(dims, self.patch)):
            if n % p:
                raise InputError(f"{name}: axis {ax + 2} has {n} cells, not divisible by the patch size {p}")
        return Grid(*(int(n // p) for n, p in zip(dims, self.patch)))

    # ------------------------------------------------------------------------------------------------ checks
    def _check_inputs(self, latents, timestep, text) -> torch.Tensor:
        cfg = self.transformer.config
        if latents.shape[1] != cfg.in_channels:
            raise InputError(f"latents: {latents.shape[1]} channels, the transformer expects {cfg.in_channels}")
        b = latents.shape[0]
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise InputError(f"encoder_hidden_states: expected ({b}, L, {cfg.text_dim}), got {tuple(text.shape)}")
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.ndim == 0 or timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(b)
        if timestep.shape != (b,):
            raise InputError(f"timestep: expected a scalar or ({b},), got {tuple(timestep.shape)}")
        return timestep

    def _check_proxy(self, latents: torch.Tensor, proxy: torch.Tensor) -> None:
        if self.atlas_config.mode != "atlas":
            raise InputError(f"proxy: given, but mode={self.atlas_config.mode!r} reads no proxy (use mode='atlas')")
        pg = self.proxy_geometry(self.token_grid(latents)).grid
        want = (latents.shape[1], *(n * p for n, p in zip(pg.dims, self.patch)))
        if proxy.ndim != 5 or tuple(proxy.shape[1:]) != want or proxy.shape[0] not in (1, latents.shape[0]):
            raise InputError(
                f"proxy: expected (B or 1, {', '.join(map(str, want))}) for latents "
                f"{tuple(latents.shape)} with temporal_scale={self.atlas_config.temporal_scale}, "
                f"spatial_scale={self.atlas_config.spatial_scale}; got {tuple(proxy.shape)}"
            )

    # ------------------------------------------------------------------------------------------------ proxy
    def _proxy_kv(self, latents, timestep, text, proxy, cache, noise) -> ProxyKV:
        if cache is not None:
            if proxy is not None and not cache.matches(proxy, text):
                raise InputError("proxy_cache: built for a different proxy or prompt than the one given")
            self._check_proxy(latents, cache.proxy)
            return cache.kv
        self._check_proxy(latents, proxy)
        if self.atlas_config.proxy_mode == "joint":
            b = latents.shape[0]
            noise = torch.randn_like(proxy.expand(b, *proxy.shape[1:])) if noise is None else noise
            return self.joint_proxy_kv(proxy.to(latents.dtype), noise, timestep, text)
        if torch.is_grad_enabled():  # training: keys/values must carry gradients; no cache
            return self.build_proxy_cache(proxy, text).kv
        cache = self._proxy_cache
        if cache is None or not cache.matches(proxy, text) or cache.weights != weights_key(self.transformer):
            self._proxy_cache = self.build_proxy_cache(proxy, text)
        return self._proxy_cache.kv

    def _proxy_attend(self, grid: Grid, device, record: bool, keep: KeepRows | None = None) -> tuple[Attend, ProxyKV]:
        """Attention of the proxy path: full attention over proxy tokens at stage-1 positions (time x r_t);
        ``record``: each layer's keys (rotated at detail positions) and values are kept, ``keep(layer)``'s rows
        only when given."""
        own = self._kept_tables("own", grid, device, self.proxy_rotary)
        detail = self._kept_tables("detail", grid, device, self.proxy_detail_rotary) if record else None
        kv = ProxyKV(grid)
        reference = self.atlas_config.backend == "reference"

        def attend(layer, q, k, v):
            if record:
                _record(kv, layer, k, v, detail, keep)
            qr, kr = apply_rotary(q, own), apply_rotary(k, own)
            return reference_attention(qr, kr, v) if reference else sdpa(qr, kr, v)

        return attend, kv

    def _kept_tables(self, kind: str, grid: Grid, device, build) -> RotaryTables:
        """``build(grid)`` on ``device``, built once per (kind, grid, device) and kept (the last grid only)."""
        key = (kind, grid, str(torch.device(device)), self.atlas_config.temporal_scale, self.atlas_config.spatial_scale)
        if key not in self._proxy_tables:
            self._proxy_tables = {k: v for k, v in self._proxy_tables.items() if k[1] == grid}
            self._proxy_tables[key] = build(grid).to(device)
        return self._proxy_tables[key]

    def proxy_rotary(self, grid: Grid) -> RotaryTables:
        """RoPE tables of stage 1 for every proxy token (raster order): time scaled by r_t, space unscaled."""
        return self.rotary.for_grid(grid, (float(self.atlas_config.temporal_scale), 1.0, 1.0))

    def proxy_anchor(self) -> ProxyAnchor:
        return ProxyAnchor(self.atlas_config.temporal_scale, self.atlas_config.spatial_scale)

    def proxy_detail_rotary(self, grid: Grid) -> RotaryTables:
        """RoPE tables of the proxy keys detail queries read: each proxy token at its detail position
        (:class:`ProxyAnchor`: time j * r_t, space i * s + (s - 1) / 2)."""
        return self.rotary.tables(self.proxy_anchor().positions(grid))

    def _record_proxy(self, proxy, timestep, text, grid, keep: KeepRows | None = None) -> ProxyKV:
        attend, kv = self._proxy_attend(grid, proxy.device, record=True, keep=keep)
        self._run(proxy, timestep, text, grid, attend, head=False, checkpoint=False)
        return kv

    # ------------------------------------------------------------------------------------------------ forward
    def _run(
        self,
        latents,
        timestep,
        text,
        grid: Grid,
        attend: Attend,
        head: bool = True,
        checkpoint: bool = True,
        block_cache: FirstBlockCache | None = None,
    ) -> torch.Tensor | None:
        x, temb, tproj, text = self.embed(latents, timestep, text)
        x = self.run_blocks(x, text, tproj, attend, checkpoint=checkpoint, cache=block_cache)
        if not head:
            return None
        return self.head(x, temb, grid, latents.shape[0])

    # -------------------------------------------------------------- pieces for runtimes that shard the tokens
    def embed(self, latents, timestep, text):
        """Patch-embed latents to tokens (B, N, D) in raster order; embed timestep and text.

        Returns (tokens, temb, tproj (B, 6, D), text (B, L, D)). Every later op but self-attention is per token,
        so a runtime may keep only its own tokens and run :meth:`run_blocks` on them.
        """
        tr = self.transformer
        x = tr.patch_embedding(latents).flatten(2).transpose(1, 2)  # (B, N, D)
        temb, tproj, text, _ = tr.condition_embedder(timestep, text, None)
        return x, temb, tproj.unflatten(1, (6, -1)), text  # tproj (B, 6, D)

    def run_blocks(
        self,
        x,
        text,
        tproj,
        attend: Attend,
        checkpoint: bool = True,
        cache: FirstBlockCache | None = None,
        move: Move | None = None,
    ) -> torch.Tensor:
        """All blocks on tokens x (B, n, D); ``attend(layer, q, k, v)`` does the self-attention of those tokens.

        With ``cache`` (inference only), the blocks after the first are skipped when the cache allows it. With
        ``move`` (a runtime whose ranks move rows instead of exchanging a halo), the rows are put in each layer's
        layout before its block and back in the given one at the end.
        """
        move = move or _stay
        if cache is not None and not torch.is_grad_enabled():
            return self._run_blocks_cached(x, text, tproj, attend, cache, move)
        tr = self.transformer
        use_ckpt = checkpoint and torch.is_grad_enabled() and getattr(tr, "gradient_checkpointing", False)
        at = None
        for i, block in enumerate(tr.blocks):
            x, at = move(at, i, x), i
            if use_ckpt:
                x = torch.utils.checkpoint.checkpoint(
                    self._block, i, block, x, text, tproj, attend, use_reentrant=False
                )
            else:
                x = self._block(i, block, x, text, tproj, attend)
        return move(at, None, x)

    def _run_blocks_cached(self, x, text, tproj, attend: Attend, cache: FirstBlockCache, move: Move) -> torch.Tensor:
        """The first block, then the others or the residual they added at the cache's reference forward (both
        in the given layout)."""
        blocks = self.transformer.blocks
        h = move(0, None, self._block(0, blocks[0], move(None, 0, x), text, tproj, attend))
        first = h - x  # (B, n, D)
        if cache.reuse(first):
            return h + cache.rest
        out, at = h, None
        for i in range(1, len(blocks)):
            out, at = move(at, i, out), i
            out = self._block(i, blocks[i], out, text, tproj, attend)
        out = move(at, None, out)
        cache.store(first, out - h)
        return out

    def _block(self, i: int, block: nn.Module, x, text, tproj, attend: Attend) -> torch.Tensor:
        """One WanTransformerBlock with its own layers, self-attention by ``attend`` (same arithmetic as diffusers)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + tproj.float()).chunk(6, dim=1)
        # 1. self-attention
        h = self.ops.modulated_norm(block.norm1, x, scale, shift)
        x = self.ops.gated_residual(x, self._self_attention(i, block.attn1, h, attend), gate)
        # 2. cross-attention to the text
        h = block.norm2(x.float()).type_as(x)
        x = x + block.attn2(h, text, None, None)
        # 3. feed-forward (per token: chunks of tokens give the same result)
        n, chunk = x.shape[1], self.ffn_chunk
        if not chunk or chunk >= n:
            return self.ops.feed_forward(block, x, c_shift, c_scale, c_gate)
        out = torch.empty_like(x)  # (B, n, D)
        for lo in range(0, n, chunk):
            out[:, lo : lo + chunk] = self.ops.feed_forward(block, x[:, lo : lo + chunk], c_shift, c_scale, c_gate)
        return out

    def _self_attention(self, i: int, attn: nn.Module, h: torch.Tensor, attend: Attend) -> torch.Tensor:
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(h).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = q.unflatten(2, (attn.heads, -1))  # (B, N, H, D)
        k = k.unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        out = attend(i, q, k, v).flatten(2, 3).type_as(q)  # (B, N, H*D)
        return attn.to_out[1](attn.to_out[0](out))

    def head(self, x, temb, grid: Grid, b: int) -> torch.Tensor:
        """Tokens (B, N, D) in raster order -> velocity (B, C, f, h, w)."""
        tr = self.transformer
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (tr.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = tr.proj_out(x)  # (B, N, pt*ph*pw*C)
        pt, ph, pw = self.patch
        x = x.reshape(b, grid.t, grid.h, grid.w, pt, ph, pw, -1)  # (B, f, h, w, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, f*pt, h*ph, w*pw)


def modulated_norm(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Wan's adaLN: norm(x) in fp32, scaled and shifted by the timestep's modulation, in x's dtype."""
    return (norm(x.float()) * (1 + scale) + shift).type_as(x)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, added in fp32, in x's dtype."""
    return (x.float() + y * gate).type_as(x)


def feed_forward(block: nn.Module, x: torch.Tensor, c_shift, c_scale, c_gate) -> torch.Tensor:
    """x + gate * FFN(modulated norm of x) on tokens x (B, n, D)."""
    return gated_residual(x, block.ffn(modulated_norm(block.norm3, x, c_scale, c_shift)).float(), c_gate)


@dataclass(frozen=True)
class BlockOps:
    """A block's code around its attentions: eager, or each function through torch.compile (regional compile: one
    graph serves every block, since the blocks' modules are inputs, not constants; the element-wise work of
    norms, modulation, GELU and gated residuals fuses into few kernels). The first forward on each new shape
    compiles (seconds on the tiny model, minutes at scale); the result equals eager's to rounding."""

    modulated_norm: Callable
    gated_residual: Callable
    feed_forward: Callable

    @classmethod
    def of(cls, compiled: bool) -> "BlockOps":
        fns = (modulated_norm, gated_residual, feed_forward)
        return cls(*(torch.compile(f) for f in fns)) if compiled else cls(*fns)


def _diffusers_latents(latents, hidden_states, timestep, text, attention_kwargs) -> torch.Tensor:
    """The latents given by either name; the other inputs present; no attention_kwargs (LoRA scale) to ignore."""
    if (latents is None) == (hidden_states is None):
        raise InputError("latents: give exactly one of latents and hidden_states (diffusers' name)")
    if timestep is None or text is None:
        raise InputError("timestep and encoder_hidden_states are required")
    scale = (attention_kwargs or {}).get("scale", 1.0)
    if set(attention_kwargs or {}) - {"scale"} or scale != 1.0:
        raise InputError(f"attention_kwargs={attention_kwargs!r}: not supported (set adapter weights instead)")
    return latents if latents is not None else hidden_states


def _check_transformer(tr: nn.Module) -> None:
    cfg = getattr(tr, "config", None)
    needed = ("patch_embedding", "condition_embedder", "blocks", "norm_out", "proj_out", "scale_shift_table")
    if cfg is None or not all(hasattr(tr, n) for n in needed):
        raise ConfigError("transformer", type(tr).__name__, "must be a diffusers WanTransformer3DModel")
    if getattr(cfg, "image_dim", None) or getattr(cfg, "added_kv_proj_dim", None):
        raise ConfigError("transformer", "image-to-video", "only Wan2.1 text-to-video transformers are supported")


def _record(kv: ProxyKV, layer: int, k: torch.Tensor, v: torch.Tensor, tables: RotaryTables, keep) -> None:
    """Append one layer's proxy keys (rotated by ``tables``) and values (B, Np, H, D) to ``kv``: all rows, or
    ``keep(layer)``'s, selected before the rotation so that only those rows are ever copied."""
    rows = None if keep is None else keep(layer)
    if rows is not None:
        rows = rows.to(k.device)
        k, v, tables = k.index_select(1, rows), v.index_select(1, rows), tables.index(rows)  # (B, U, H, D)
    kv.keys.append(apply_rotary(k, tables))
    kv.values.append(v)
    kv.rows.append(rows)


def _stay(frm, to, x: torch.Tensor) -> torch.Tensor:
    """The ``move`` of a forward whose rows keep one layout for every layer."""
    return x
