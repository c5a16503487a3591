"""The one cost model: tokens, FLOPs, memory, bytes and seconds of a run, before anything loads.

Used by ``atlasvid-dist plan``, the pre-flight memory check of ``generate`` and the benchmarks. Everything is
computed from the same geometry the kernels run on (``geometry``), the same sharding the runtime uses
(``parallel.sharding``) and the model's shapes (``ModelSpec``).

Conventions (stated once, used everywhere):

* Attention FLOPs = 4 * Lq * Lk * head_dim * heads: QK^T and PV, a multiply-add counted as 2 FLOPs. Window
  attention counts what the kernel executes: every window at its real lengths (the partial windows of a padded
  grid are cut, not padded), on one device and on a rank of a multi-rank run alike, where a rank computes its own
  query rows only, against its windows' real keys (``parallel/halo.py``, ``models.attention.kernels``).
* Linear FLOPs = 2 * tokens * in * out. Per block: self-attention Q, K, V, O (4 d^2 per token), cross-attention
  Q and O on video tokens (2 d^2), K and V on the text tokens (2 d^2 per text token), its attention core over
  ``text_len`` keys, and the FFN (2 d f per token).
* "Per layer" figures are for one forward of the whole video (batch 1), averaged over the model's layers (the
  window schedule cycles, shifted grids have more, padded windows). A denoising step runs ``passes`` forwards
  (2 with classifier-free guidance: conditional and unconditional, one after the other).
* Text encoder and VAE decode FLOPs are estimates (2 * params * tokens; a measured FLOPs-per-pixel constant).
* Seconds = FLOPs / (peak * efficiency) + bytes / link bandwidth, no overlap; bytes between ranks of one node
  (``ParallelPlan.gpus_per_node``) at NVLink bandwidth, across nodes at InfiniBand bandwidth (device profile). Memory-bound element-wise work
  (norms, modulation, RoPE, gathers) is not modelled, so the seconds are a lower bound. Measured on an H100, one
  forward: 14B 720P x 81 full attention 13.3 s vs 12.0 estimated; 1.3B atlas 4K x 81 10.9 s vs 5.1, 2K x 81
  5.6 s vs 2.5 (window mode spends half its time in memory-bound work today).
* Memory at inference (no autograd): weights + the largest live activations of one block + caches, per phase
  (text encoding, stage 1, stage 2, decode); a rank's peak is the largest phase. The activation widths below are
  calibrated against measured peaks (see ``calibrate.py``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..config.generate import DECODE_ORDERS, DETAIL_INITS, DetailSchedule, GenerateConfig
from ..config.method import AtlasConfig
from ..config.model import ModelSpec
from ..config.parallel import ParallelPlan, runnable_proxy_parallel
from ..config.video import VideoSpec
from ..errors import ConfigError, PlanError, check
from ..geometry.grid import Grid, ProxyGeometry, latent_grid, token_grid
from ..geometry.tiles import balance_by_area, tile_spans
from ..geometry.windows import WindowSpec
from ..models.attention.kernels import auto_window_batch
from ..parallel.sharding import SHIFT_EXCHANGES, WINDOW_ORDERS
from .attention import (
    attention_flops,
    layer_attention_flops,
    layer_spec,
    pair_flops,
    pooled_tokens,
    proxy_context_tokens,
)
from .profiles import DeviceProfile, GiB, device_profile
from .ranks import assigned_owner, group_share, moved_rows, owner_of_tokens, shard

_GENERATE = {f.name: f.default for f in dataclasses.fields(GenerateConfig)}
"""generate's defaults: the cost model prices the run generate makes unless told otherwise."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = ("auto", *DTYPE_BYTES)

#: Live activation width per token in the FFN phase of a block: its two f-wide tensors (projection out, GELU out)
#: plus this many d-wide ones (residual stream, the modulated input made in fp32 = 2 widths, the FFN output, the
#: fp32 residual add). Calibrated on an H100, bf16, one forward (``python -m atlasvid_dist.cost.calibrate``):
#: 1.3B 4K x 81 atlas 43.0 GB measured / 45.8 modelled; 1.3B 2K x 81 atlas 24.4 / 24.2; 14B 720P x 81 full
#: 38.0 / 38.2. Rounded up (7, not the 6.3 that fits best) so the fit check errs on the safe side.
FFN_PHASE_D_WIDTHS = 7
#: Live d-wide tensors per token in the attention phase: the residual stream and the block's normed input, q, k, v,
#: the rotated q and k, the key and value row tables (own rows then the proxy's), the output; the window-major
#: gathers exist one chunk of windows at a time (``_attention_chunk_bytes``; halo rows come on top).
ATTENTION_PHASE_D_WIDTHS = 10
#: Latent-sized tensors alive when a forward starts, without guidance: the latents and what the sampler keeps
#: between steps (diffusers' UniPC of order 2, Wan's scheduler: the last sample and two x0 predictions). With
#: guidance each earlier pass of the step adds its velocity (cond is held while uncond runs). Traced on the real
#: sampling loop by tests/test_memory_trace.py (steady state, from the third step on).
SAMPLER_LATENT_COPIES = 4
VAE_BYTES = 4  # the VAE runs in fp32
LATENT_CHANNELS_BYTES = 4  # latents travel in fp32


@dataclass(frozen=True)
class RunSettings:
    """Sampling settings the cost depends on (names and defaults as in GenerateConfig, read from it)."""

    dtype: str = _GENERATE["dtype"]
    """'auto' (bf16 on CUDA, fp32 on CPU), 'fp32', 'bf16' or 'fp16': weights and activations."""
    steps: int = _GENERATE["steps"]
    """Detail-stage denoising steps (from noise)."""
    proxy_steps: int = _GENERATE["proxy_steps"]
    """Proxy-stage denoising steps."""
    guidance: float = _GENERATE["guidance"]
    """Classifier-free guidance scale; > 1 runs two forwards per step (conditional, unconditional)."""
    detail_init: str = _GENERATE["detail_init"]
    """'noise', or 'proxy': start from the upsampled proxy noised to ``init_strength``."""
    init_strength: float = _GENERATE["init_strength"]
    """With detail_init='proxy': fraction of the detail steps that run."""
    detail_cfg_until: float = _GENERATE["detail_cfg_until"]
    """CFG truncation: fraction of the detail schedule that runs guidance (two forwards a step); the rest one."""
    detail_reuse: float = _GENERATE["detail_reuse"]
    """First-block cache threshold (0 = off). Which forwards it skips is decided at run time, so the seconds and
    FLOPs here count every forward as run in full; its memory (two residuals per prompt) is counted."""
    decode_tile: int = 32
    """Spatial VAE decode tile in latent cells (8 px each)."""
    decode_overlap: int = _GENERATE["decode_overlap"]
    """Overlap of decode tiles in latent cells."""
    decode_batch: int = 1
    """Equal-shaped decode tiles per VAE call (one call's activations grow with it; the caches do not)."""
    decode_order: str = _GENERATE["decode_order"]
    """'together' (a rank's tiles advance together: every tile's causal cache live at once), 'sequential' (tile
    after tile: one tile's cache; the driver's blender holds the clip's frames) or 'auto' (sequential only when
    together does not fit)."""
    offload_encoders: bool = _GENERATE["offload_encoders"]
    """generate's offload_encoders: the text encoder is on the GPU for the text encoding only, the VAE for the
    decode only."""
    ffn_chunk_tokens: int = _GENERATE["ffn_chunk"]
    """generate's ffn_chunk: the FFN phase of a block over chunks of this many tokens; 0 = all at once."""

    def __post_init__(self) -> None:
        check(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        for name in ("steps", "proxy_steps", "decode_tile", "decode_batch"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "must be an integer >= 1")
        check(
            isinstance(self.guidance, (int, float))
            and not isinstance(self.guidance, bool)
            and math.isfinite(self.guidance)
            and self.guidance >= 0,
            "guidance",
            self.guidance,
            "must be a finite number >= 0",
        )
        check(self.detail_init in DETAIL_INITS, "detail_init", self.detail_init, f"must be one of {DETAIL_INITS}")
        check(
            isinstance(self.init_strength, (int, float)) and 0 < self.init_strength <= 1,
            "init_strength",
            self.init_strength,
            "must be in (0, 1]",
        )
        check(
            isinstance(self.decode_overlap, int) and 0 <= self.decode_overlap < self.decode_tile,
            "decode_overlap",
            self.decode_overlap,
            f"must be an integer in [0, decode_tile = {self.decode_tile})",
        )
        check(
            isinstance(self.detail_cfg_until, (int, float)) and 0 <= self.detail_cfg_until <= 1,
            "detail_cfg_until",
            self.detail_cfg_until,
            "must be in [0, 1]",
        )
        check(
            isinstance(self.detail_reuse, (int, float)) and 0 <= self.detail_reuse < 1,
            "detail_reuse",
            self.detail_reuse,
            "must be in [0, 1)",
        )
        check(self.decode_order in DECODE_ORDERS, "decode_order", self.decode_order, f"must be one of {DECODE_ORDERS}")
        check(isinstance(self.offload_encoders, bool), "offload_encoders", self.offload_encoders, "must be true/false")
        check(
            isinstance(self.ffn_chunk_tokens, int)
            and not isinstance(self.ffn_chunk_tokens, bool)
            and self.ffn_chunk_tokens >= 0,
            "ffn_chunk_tokens",
            self.ffn_chunk_tokens,
            "must be an integer >= 0",
        )

    @property
    def passes(self) -> int:
        """Forwards per denoising step."""
        return 2 if self.guidance > 1 else 1

    @property
    def schedule(self) -> DetailSchedule:
        """The detail steps as generate runs them (GenerateConfig's rule)."""
        return DetailSchedule.of(self.steps, self.detail_init, self.init_strength, self.detail_cfg_until)

    @property
    def detail_steps(self) -> int:
        """Detail steps that actually run (fewer with proxy init)."""
        return self.schedule.run

    @property
    def detail_forwards(self) -> int:
        """Detail forwards: one per step, two for the steps that run guidance."""
        return self.schedule.forwards(self.passes == 2)

    def dtype_for(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if device == "cuda" else "fp32"


@dataclass(frozen=True)
class CostReport:
    """Every number the plan shows (bytes, FLOPs, seconds); ``to_dict()`` for JSON."""

    inputs: dict
    """The settings it was computed for."""
    detail_grid: tuple[int, int, int]
    """Detail token grid (t, h, w)."""
    proxy_grid: tuple[int, int, int] | None
    """Proxy token grid, or None without a proxy stage (full, ultragen)."""
    detail_tokens: int
    """Tokens of the detail branch."""
    proxy_tokens: int
    """Tokens of the proxy (0 without a proxy stage)."""
    num_windows: int
    """Windows of the base (unshifted) grid (0 in full mode)."""
    window_tokens: int
    """Tokens per window (0 in full mode)."""
    proxy_context_tokens: int
    """Proxy keys one window reads (aligned region or all)."""
    windows_per_rank: int
    """Base windows of the heaviest window group."""
    tokens_per_rank: int
    """Detail tokens (queries) of the heaviest rank."""
    detail_steps: int
    """Detail steps that run (fewer with proxy init)."""
    detail_forwards: int
    """Detail forwards that run (two per guided step, one per step after CFG truncation)."""
    attention_flops_per_layer: dict
    """mode -> detail self-attention FLOPs of one layer (whole video, one forward); None where not applicable."""
    attention_flops_ratio: float
    """Full attention over the chosen mode, per layer."""
    attention_flops_ratios: dict
    """mode -> full over that mode."""
    linear_flops_per_layer: dict
    """qkvo / cross_attention / ffn / total for the detail tokens, one forward."""
    flops_per_step: dict
    """detail (all ranks, all passes), proxy (stage-1 step), detail_per_rank."""
    flops_per_video: dict
    """text_encoder (estimate), proxy_stage, proxy_cache, detail_stage, vae_decode (estimate), total."""
    step_flops_ratio_vs_full: float
    """Detail step FLOPs of full attention over this mode's (the per-step speedup the FLOPs allow)."""
    attention_free_limit: float
    """Full-attention step FLOPs over the step without self-attention: the most any attention can save."""
    memory: dict
    """phase -> {part: bytes, 'total': bytes} per rank (phases: text_encoder, proxy_stage, proxy_cache (the clean
    proxy run through every layer, its rows kept layer by layer), detail_stage, decode); resident weights are in
    every phase."""
    memory_per_rank_bytes: int
    """Peak over phases of the heaviest rank."""
    memory_usable_bytes: int
    """What the device profile allows per rank (host memory / workers on a shared-memory CPU)."""
    comm_bytes_per_step_per_rank: dict
    """Bytes a rank receives per detail step (halo, window split, ultragen global, total; across_nodes: the part
    of the total from ranks on other nodes, over InfiniBand)."""
    comm_bytes_per_proxy_step_per_rank: int
    """Bytes a stage-1 rank receives per proxy step (sequence parallelism)."""
    comm_bytes_once: dict
    """Sent once per video: the proxy latent to every detail rank, the text embeddings."""
    seconds: dict
    """Estimated seconds per stage and total (lower bound, see module docstring)."""
    fits: bool
    """True when every phase fits the usable memory."""
    reasons: tuple[str, ...]
    """Why it does not fit, with numbers and the flag that would help."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """What the user should know (cropping, padding, estimates)."""
    decode_order: str = "together"
    """Decode order the memory assumes ('together' or 'sequential'; RunSettings 'auto' resolved)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def raise_if_unfit(self) -> None:
        """Pre-flight: PlanError with the reasons when the run does not fit."""
        if not self.fits:
            raise PlanError("plan does not fit: " + "; ".join(self.reasons))


# -- FLOPs ----------------------------------------------------------------------------------------------------
def linear_flops_per_layer(model: ModelSpec, tokens: int) -> dict:
    """Linear and cross-attention FLOPs of one block over ``tokens`` video tokens (see module docstring)."""
    d, f, lt = model.dim, model.ffn_dim, model.text_len
    qkvo = 2 * tokens * 4 * d * d
    cross = 2 * tokens * 2 * d * d + 2 * lt * 2 * d * d + attention_flops(tokens, lt, model.num_heads, model.head_dim)
    ffn = 2 * tokens * 2 * d * f
    return {"qkvo": qkvo, "cross_attention": cross, "ffn": ffn, "total": qkvo + cross + ffn}


def embed_flops(model: ModelSpec, tokens: int) -> int:
    """Patch embedding in, output head out, and the text/time embedders (once per forward)."""
    patch_in = model.in_channels * math.prod(model.patch)
    d = model.dim
    text = 2 * model.text_len * (model.text_dim * d + d * d)
    return 2 * tokens * patch_in * d * 2 + text


def full_forward_flops(model: ModelSpec, tokens: int) -> int:
    """One forward with full self-attention over ``tokens`` (stage 1, the proxy cache, the full baseline)."""
    per_layer = attention_flops(tokens, tokens, model.num_heads, model.head_dim)
    per_layer += linear_flops_per_layer(model, tokens)["total"]
    return model.num_layers * per_layer + embed_flops(model, tokens)


def mode_attention_per_layer(method: AtlasConfig, model: ModelSpec, grid: Grid, mode: str) -> int:
    """Mean over the model's layers of the detail self-attention FLOPs in ``mode`` (whole video, one forward)."""
    cfg = dataclasses.replace(method, mode=mode)
    if mode == "full":
        return layer_attention_flops(cfg, grid, model.num_heads, model.head_dim)
    k, n = len(cfg.layer_entries()), model.num_layers
    total = sum(
        len(range(i, n, k)) * layer_attention_flops(cfg, grid, model.num_heads, model.head_dim, layer=i)
        for i in range(min(k, n))
    )
    return total // n


# -- the estimate ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    grid: Grid
    proxy: Grid | None
    specs: tuple[tuple[WindowSpec, int], ...]  # (layer grid, layers using it)
    base: WindowSpec | None


def _geometry(video: VideoSpec, model: ModelSpec, method: AtlasConfig) -> _Geometry:
    grid = token_grid(latent_grid(video.frames, video.gen_height, video.gen_width), model.patch)
    proxy = None
    if method.mode == "atlas":
        proxy = ProxyGeometry(grid, method.temporal_scale, method.spatial_scale).grid
    if not method.uses_windows:
        return _Geometry(grid, proxy, (), None)
    k, n = len(method.layer_entries()), model.num_layers
    specs = tuple((layer_spec(method, grid, i), len(range(i, n, k))) for i in range(min(k, n)))
    window = method.layer_entries()[0][0]
    base = WindowSpec(grid, window, (0, 0, 0), pad=method.pad_windows)
    return _Geometry(grid, proxy, specs, base)


def estimate(
    video: VideoSpec,
    model: ModelSpec,
    method: AtlasConfig,
    plan: ParallelPlan,
    run: RunSettings | None = None,
    profile: str | DeviceProfile = "h100",
    *,
    suggest: bool = True,
) -> CostReport:
    """Cost of generating ``video`` with ``model`` / ``method`` on ``plan`` (see the module docstring).

    ``suggest``: when the detail stage does not fit, look for the smallest worker count that does (re-estimates).

    Raises ConfigError for geometry that does not work (window not tiling, proxy scale not dividing) and PlanError
    for a plan the model or windows cannot carry; a run that does not fit memory is reported (fits=False).
    """
    run = run or RunSettings()
    prof = profile if isinstance(profile, DeviceProfile) else device_profile(profile)
    if run.detail_init == "proxy":
        check(
            method.mode == "atlas",
            "detail_init",
            run.detail_init,
            f"'proxy' needs a proxy; mode {method.mode!r} has none",
        )
    elif run.init_strength != RunSettings.init_strength:
        warnings.warn("init_strength has no effect with detail_init='noise'", stacklevel=2)
    geo = _geometry(video, model, method)
    plan.check_against(model, geo.base.num_windows if geo.base else None)
    order, exchange = _choose_sharding(geo, method, plan, prof)
    plan = dataclasses.replace(plan, window_order=order, shift_exchange=exchange)
    dtype = run.dtype_for(plan.device)
    b = DTYPE_BYTES[dtype]
    shares = _shares(geo, method, plan)

    attn = {m: _maybe(mode_attention_per_layer, method, model, geo.grid, m) for m in ("full", "atlas", "ultragen")}
    ratios = {m: (attn["full"] / v if v else None) for m, v in attn.items()}
    linear = linear_flops_per_layer(model, geo.grid.size)
    flops = _flops(geo, model, method, plan, run, attn[method.mode], linear, shares)
    usable = prof.usable_bytes // (plan.workers if prof.shared_memory else 1)
    memory, decode_order = _memory(geo, model, method, plan, run, b, shares, prof, usable)
    comm = _comm(geo, model, method, plan, run, b, shares)
    seconds = _seconds(geo, model, method, plan, run, prof, flops, comm, dtype)
    peak = max(phase["total"] for phase in memory.values())
    report = CostReport(
        inputs=_inputs(video, model, method, plan, run, prof, dtype),
        detail_grid=geo.grid.dims,
        proxy_grid=geo.proxy.dims if geo.proxy else None,
        detail_tokens=geo.grid.size,
        proxy_tokens=geo.proxy.size if geo.proxy else 0,
        num_windows=geo.base.num_windows if geo.base else 0,
        window_tokens=geo.base.window_tokens if geo.base else 0,
        proxy_context_tokens=_context_tokens(geo, method),
        windows_per_rank=_windows_per_group(geo, plan),
        tokens_per_rank=shares["tokens_per_rank"],
        detail_steps=run.detail_steps,
        detail_forwards=run.detail_forwards,
        attention_flops_per_layer=attn,
        attention_flops_ratio=ratios[method.mode],
        attention_flops_ratios=ratios,
        linear_flops_per_layer=linear,
        flops_per_step=flops["step"],
        flops_per_video=flops["video"],
        step_flops_ratio_vs_full=flops["full_step"] / flops["step"]["detail"],
        attention_free_limit=flops["full_step"] / flops["no_attention_step"],
        memory=memory,
        memory_per_rank_bytes=peak,
        memory_usable_bytes=usable,
        comm_bytes_per_step_per_rank=comm["step"],
        comm_bytes_per_proxy_step_per_rank=comm["proxy_step"],
        comm_bytes_once=comm["once"],
        seconds=seconds,
        fits=peak <= usable,
        reasons=(),
        decode_order=decode_order,
        notes=tuple(_notes(video, geo, model, method, plan, dtype) + _run_notes(run)),
    )
    if not report.fits:
        reasons = _reasons(report, video, model, method, plan, run, prof, dtype, suggest)
        report = dataclasses.replace(report, reasons=tuple(reasons))
    return report


def _maybe(fn, *args):
    """A comparison column (another mode) that this geometry cannot run is None, not an error."""
    try:
        return fn(*args)
    except ConfigError:
        return None


def choose_window_order(
    video: VideoSpec, model: ModelSpec, method: AtlasConfig, plan: ParallelPlan, profile: str | DeviceProfile = "h100"
) -> str:
    """``plan.window_order`` with 'auto' resolved (see :func:`choose_sharding`)."""
    return choose_sharding(video, model, method, plan, profile).window_order


def choose_sharding(
    video: VideoSpec, model: ModelSpec, method: AtlasConfig, plan: ParallelPlan, profile: str | DeviceProfile = "h100"
) -> ParallelPlan:
    """``plan`` with 'auto' resolved in ``window_order`` and ``shift_exchange``: the ownership order and shift
    exchange whose traffic per forward takes the least link time (NVLink inside a node, InfiniBand across); ties
    to the first of ``WINDOW_ORDERS`` and to 'kv'. What estimate, plan and the runtime's sharding use."""
    prof = profile if isinstance(profile, DeviceProfile) else device_profile(profile)
    order, exchange = _choose_sharding(_geometry(video, model, method), method, plan, prof)
    return dataclasses.replace(plan, window_order=order, shift_exchange=exchange)


def _choose_sharding(geo: _Geometry, method: AtlasConfig, plan: ParallelPlan, prof: DeviceProfile) -> tuple[str, str]:
    orders = WINDOW_ORDERS if plan.window_order == "auto" else (plan.window_order,)
    exchanges = SHIFT_EXCHANGES if plan.shift_exchange == "auto" else (plan.shift_exchange,)
    if geo.base is None or plan.num_window_groups == 1:
        return orders[0], exchanges[0]
    if plan.window_group > 1:
        exchanges = ("kv",)  # a split window cannot move whole

    def link_seconds(choice: tuple[str, str]) -> float:
        shares = _shares(geo, method, dataclasses.replace(plan, window_order=choice[0], shift_exchange=choice[1]))
        rows, remote = _shift_rows(shares)
        return _link_seconds(rows, remote, prof)

    return min(((o, e) for o in orders for e in exchanges), key=link_seconds)  # min keeps the first of equal ones


def _shift_rows(shares: dict) -> tuple[int, int]:
    """D-wide rows a forward's shifted layers send from the heaviest group (all, and across nodes): twice the
    halo tokens (a key and a value each) with exchange 'kv', the moved rows with 'rows'."""
    if shares.get("moves") is not None:
        return shares["moves"].sent, shares["moves"].sent_remote
    layers = shares["layers"]
    return 2 * sum(n * sh.halo_tokens for _, n, sh in layers), 2 * sum(n * sh.halo_remote_tokens for _, n, sh in layers)


def _context_tokens(geo: _Geometry, method: AtlasConfig) -> int:
    if geo.proxy is None or geo.base is None:
        return 0
    return proxy_context_tokens(method, geo.base, geo.proxy)


def _windows_per_group(geo: _Geometry, plan: ParallelPlan) -> int:
    if geo.base is None:
        return 0
    b = shard(geo.base, plan.num_window_groups, plan.window_order).bounds
    return max(hi - lo for lo, hi in zip(b[:-1], b[1:]))


def _shares(geo: _Geometry, method: AtlasConfig, plan: ParallelPlan) -> dict:
    """Per layer grid: the heaviest group's share; and the heaviest rank's query tokens."""
    if geo.base is None:  # full attention: the flat sequence split over all workers
        return {"tokens_per_rank": -(-geo.grid.size // plan.workers), "layers": ()}
    g = plan.num_window_groups
    base_owner = owner_of_tokens(shard(geo.base, g, plan.window_order))
    rows = plan.shift_exchange == "rows"
    owners = {geo.base: base_owner}
    for spec, _ in geo.specs:  # where each layer grid's rows live (parallel.window_attention.layer_holdings)
        if spec not in owners:
            owners[spec] = assigned_owner(base_owner, spec, g) if rows else base_owner
    s = float(method.spatial_scale)
    scales = (float(method.temporal_scale), s, s)
    aligned = method.proxy_context == "aligned"
    node = torch.arange(g) * plan.window_group // plan.gpus_per_node  # node of each group
    layers = tuple(
        (spec, n, group_share(owners[spec], g, spec, geo.proxy, scales, method.proxy_margin, aligned, node))
        for spec, n in geo.specs
    )
    moves = None
    if rows:  # the forward's layers in turn, the base layout first and last (AtlasTransformer.run_blocks)
        k, n_layers = len(geo.specs), sum(n for _, n in geo.specs)
        sequence = [base_owner] + [owners[geo.specs[i % k][0]] for i in range(n_layers)] + [base_owner]
        moves = moved_rows(sequence, g, node)
    tokens = max(sh.tokens for _, _, sh in layers)
    return {"tokens_per_rank": -(-tokens // plan.window_group), "layers": layers, "moves": moves}


def _rank_attention(geo: _Geometry, model: ModelSpec, method: AtlasConfig, plan: ParallelPlan, shares: dict) -> int:
    """Detail self-attention FLOPs of the heaviest rank, summed over layers, one forward."""
    h, hd = model.num_heads, model.head_dim
    if geo.base is None:
        return model.num_layers * attention_flops(geo.grid.size, geo.grid.size, h, hd) // plan.workers
    total = 0
    for spec, n, sh in shares["layers"]:
        ctx = proxy_context_tokens(method, spec, geo.proxy) if geo.proxy is not None else 0
        per_layer = pair_flops(sh.key_pairs, sh.tokens, ctx, h, hd)  # windows at their real lengths
        if method.mode == "ultragen":  # the rank's share of the pooled queries against all pooled keys
            pooled = pooled_tokens(method, geo.grid)
            per_layer += attention_flops(-(-pooled * sh.tokens // geo.grid.size), pooled, h, hd)
        total += n * per_layer // plan.window_group
    return total


def _flops(geo, model, method, plan, run, attn_mode, linear, shares) -> dict:
    n, L, passes = geo.grid.size, model.num_layers, run.passes
    no_attn = L * linear["total"] + embed_flops(model, n)
    detail_fwd = L * attn_mode + no_attn  # one forward, all ranks
    full_step = passes * full_forward_flops(model, n)
    rank_tokens = shares["tokens_per_rank"]
    rank_attn = passes * _rank_attention(geo, model, method, plan, shares)
    rank_linear = L * linear_flops_per_layer(model, rank_tokens)["total"] + embed_flops(model, rank_tokens)
    rank = rank_attn + passes * rank_linear
    proxy_fwd = full_forward_flops(model, geo.proxy.size) if geo.proxy else 0
    joint = method.proxy_mode == "joint" and geo.proxy is not None
    if joint:  # the proxy runs inside every detail forward, on every rank
        detail_fwd += proxy_fwd * plan.workers
        rank += passes * proxy_fwd
    detail = passes * detail_fwd
    proxy_step = passes * proxy_fwd
    cache = 0 if joint or geo.proxy is None else passes * proxy_fwd * plan.workers  # each rank builds its own
    text = 2 * model.text_encoder_params * model.text_len * passes
    vae = int(model.vae_decode.flops_per_pixel * _decode_pixels(geo, run))
    video = {
        "text_encoder": text,
        "proxy_stage": proxy_step * run.proxy_steps,
        "proxy_cache": cache,
        "detail_stage": detail_fwd * run.detail_forwards,
        "vae_decode": vae,
    }
    video["total"] = sum(video.values())
    return {
        "step": {"detail": detail, "detail_per_rank": rank, "proxy": proxy_step},
        "video": video,
        "rank_attention": rank_attn,
        "full_step": full_step,
        "no_attention_step": passes * no_attn,
    }


def _decode_pixels(geo: _Geometry, run: RunSettings) -> float:
    """Output pixel-frames the tiled decoder computes (tile overlap counted twice)."""
    frames = (geo.grid.t - 1) * 4 + 1
    _, cells, _ = decode_tiles(geo, run)
    return frames * cells * 64  # 8 x 8 pixels per latent cell


# -- memory ---------------------------------------------------------------------------------------------------
#: d-wide tensors over all of a rank's tokens while the FFN runs chunk by chunk: the block's input and the output
#: being filled (``AtlasTransformer._block`` with ffn_chunk).
FFN_CHUNKED_RESIDENT_D_WIDTHS = 2


def _activations(
    model: ModelSpec, tokens: int, b: int, extra_d_rows: float = 0.0, ffn_chunk: int = 0, attention_chunk: int = 0
) -> int:
    """Peak live activations of one block over ``tokens`` (inference), bytes. ``ffn_chunk`` > 0: the FFN phase runs
    over chunks of that many tokens; ``attention_chunk``: transient bytes of one windowed SDPA call."""
    d, f = model.dim, model.ffn_dim
    per_token = 2 * f + FFN_PHASE_D_WIDTHS * d
    if ffn_chunk and ffn_chunk < tokens:
        ffn_phase = tokens * FFN_CHUNKED_RESIDENT_D_WIDTHS * d * b + ffn_chunk * per_token * b
    else:
        ffn_phase = tokens * per_token * b
    attn_phase = tokens * ATTENTION_PHASE_D_WIDTHS * d * b + attention_chunk
    text_kv = 2 * model.text_len * d * b
    return int(max(ffn_phase, attn_phase) + extra_d_rows * d * b) + text_kv


def _attention_chunk_bytes(geo, model, method, b, shares) -> int:
    """Transient of one windowed SDPA call (models.attention.kernels.gathered_windows_sdpa): the keys and values of
    ``max_window_batch`` windows (or the automatic batch) with their proxy context, and its output."""
    if geo.base is None:
        return 0
    d, out = model.dim, 0
    for spec, _, sh in shares["layers"]:
        ctx = proxy_context_tokens(method, spec, geo.proxy) if geo.proxy is not None else 0
        lk = spec.window_tokens + ctx
        step = method.max_window_batch or auto_window_batch(1, sh.touched_windows, lk, model.num_heads, model.head_dim)
        step = min(step, sh.touched_windows)
        out = max(out, step * (2 * lk + spec.window_tokens) * d * b)
    return out


def _geometry_bytes(geo: _Geometry, model: ModelSpec, method: AtlasConfig, plan: ParallelPlan, shares: dict) -> int:
    """Tables the detail attention of a rank builds once and keeps: the RoPE cos/sin of its tokens (fp32), and per
    layer grid the int64 index tables of the windows it touches — per window its key slots, its query slots twice
    (the layout and the compacted rows), its compacted key rows and its proxy context twice (the kept rows'
    positions and the rows' extension) — plus bool masks of its query and key slots, its output positions and
    kept proxy rows; the grid's window order (one process) or the sharding's three per-token tables of the whole
    grid (a rank). (``models.attention.detail.AttentionGeometry`` on one process; ``parallel.window_attention`` on
    a rank, shared by the prompt kinds.) Every window's query and real key counts are taken as its size, which the
    shifted grids' cut windows make a few percent high; tests/test_memory_trace.py holds it to the real tables."""
    if geo.base is None:
        return 0
    rope, masks = shares["tokens_per_rank"] * model.head_dim * 4, 0
    index = (3 if plan.workers > 1 else 1) * geo.grid.size
    for spec, sh in {spec: sh for spec, _, sh in shares["layers"]}.items():  # each layer grid once
        ctx = proxy_context_tokens(method, spec, geo.proxy) if geo.proxy is not None else 0
        wt = spec.window_tokens
        index += sh.touched_windows * (3 * wt + 2 * ctx + 1) + sh.tokens + sh.proxy_tokens
        masks += 2 * sh.touched_windows * wt  # a byte a slot
    return rope + (8 * index + masks) // plan.window_group


def _resident(model: ModelSpec, run: RunSettings, b: int, phase: str) -> dict:
    """Weights on a rank's GPU in ``phase``. load_components puts the transformer, the text encoder and the VAE on
    every rank's device and they stay there; with offload_encoders the text encoder is there only
    for the text encoding and the VAE only for the decode."""
    out = {"weights": model.transformer_params * b}
    if not run.offload_encoders or phase == "text_encoder":
        out["text_encoder_weights"] = model.text_encoder_params * b
    if not run.offload_encoders or phase == "decode":
        out["vae_weights"] = model.vae_params * VAE_BYTES
    return out


def _memory(geo, model, method, plan, run, b, shares, prof: DeviceProfile, usable: int) -> tuple[dict, str]:
    """phase -> parts per rank, and the decode order used ('auto' resolved against ``usable``)."""
    d, passes = model.dim, run.passes
    phases = {"text_encoder": {**_resident(model, run, b, "text_encoder"), "activations": _activations_text(model, b)}}
    latent_token = model.in_channels * math.prod(model.patch) * b  # one token's latent, in the run's dtype
    sampler = (SAMPLER_LATENT_COPIES + passes - 1) * latent_token  # per token (SAMPLER_LATENT_COPIES)
    if geo.proxy is not None:
        sp_tokens = -(-geo.proxy.size // plan.proxy_degree)
        phases["proxy_stage"] = {
            **_resident(model, run, b, "proxy_stage"),
            "latents": sampler * geo.proxy.size,  # every rank of stage 1 steps the whole proxy latent
            "activations": _activations(model, sp_tokens, b, ffn_chunk=run.ffn_chunk_tokens),
        }
    rank_tokens = shares["tokens_per_rank"]
    detail = _resident(model, run, b, "detail_stage")
    # the sampler's copies of the rank's share of the latents; the finished proxy the stage reads, and with the
    # clean proxy one more copy in each prompt kind's cache (models.atlas_transformer.ProxyCache)
    proxy_copies = 0 if geo.proxy is None else 1 + (passes if method.proxy_mode == "clean" else 0)
    detail["latents"] = sampler * rank_tokens + proxy_copies * (geo.proxy.size if geo.proxy else 0) * latent_token
    detail["geometry"] = _geometry_bytes(geo, model, method, plan, shares)
    extra = 0.0  # halo / proxy-context rows gathered in the attention phase
    if shares["layers"]:
        sh_max_halo = max(sh.halo_tokens for _, _, sh in shares["layers"])
        extra += 2 * sh_max_halo / plan.window_group
    if shares.get("moves") is not None:  # a move's received rows, beside the rows the rank holds
        extra += shares["moves"].received_once
    if geo.proxy is not None and method.proxy_mode == "clean":
        # only the proxy keys/values this rank's windows read, per layer, for each guidance pass
        kept = sum(n * 2 * sh.proxy_tokens * d * b for _, n, sh in shares["layers"]) * passes // plan.window_group
        detail["proxy_kv_cache"] = kept
        # the rank runs the whole clean proxy through every layer (proxy_caches), keeping each layer's rows its
        # windows read as the layer is recorded (runtime.detail.RankWindows: ProxyRows as keep)
        phases["proxy_cache"] = {
            **_resident(model, run, b, "proxy_cache"),
            "kept_proxy_kv": kept,
            "activations": _activations(model, geo.proxy.size, b, ffn_chunk=run.ffn_chunk_tokens),
        }
    elif geo.proxy is not None:  # joint: the proxy runs through the rank's forward
        rank_tokens += geo.proxy.size
        # every forward records, layer by layer, the proxy rows its windows read (one guidance pass at a time)
        rows = sum(n * 2 * sh.proxy_tokens * d * b for _, n, sh in shares["layers"]) // plan.window_group
        detail["proxy_kv_joint"] = rows
    if run.detail_reuse:  # first-block cache: two residuals of the rank's tokens per prompt
        detail["block_cache"] = 2 * passes * shares["tokens_per_rank"] * d * b
    chunk = _attention_chunk_bytes(geo, model, method, b, shares)
    detail["activations"] = _activations(model, rank_tokens, b, extra, run.ffn_chunk_tokens, chunk)
    if method.mode == "ultragen":
        detail["ultragen_global"] = _ultragen_global_bytes(geo.grid, method, shares["tokens_per_rank"], d, b)
    phases["detail_stage"] = detail
    decode = {o: _decode_phase(geo, run, model, plan, prof, b, o) for o in DECODE_ORDERS if o != "auto"}
    order = run.decode_order
    if order == "auto":  # tile after tile only when all of a rank's tiles at once do not fit, and it is smaller
        together, sequential = (sum(decode[o].values()) for o in ("together", "sequential"))
        order = "together" if together <= usable or together <= sequential else "sequential"
    phases["decode"] = decode[order]
    for phase in phases.values():
        phase["total"] = sum(phase.values())
    return phases, order


def _decode_phase(geo, run: RunSettings, model: ModelSpec, plan: ParallelPlan, prof, b: int, order: str) -> dict:
    """The decode phase of a rank in ``order`` ('together' or 'sequential')."""
    decode = {**_resident(model, run, b, "decode"), **_decode_call_bytes(geo, run, model, prof, plan.workers)}
    decode["tile_caches"] = _decode_cache_bytes(geo, run, model, plan.workers, order)
    if plan.device == "cpu":  # on a GPU these are host memory
        decode.update(_decode_host_bytes(geo, run, model, plan.workers, order))
    return decode


def _ultragen_global_bytes(grid: Grid, method: AtlasConfig, rank_tokens: int, d: int, b: int) -> int:
    """Transient bytes of the compressed global branch in one layer: pooled q, k, v and their attention output
    (4 x N' rows), the channel-first copy a pooling reads and the upsampled output (2 x the rank's rows)."""
    return (4 * pooled_tokens(method, grid) + 2 * rank_tokens) * d * b


def _activations_text(model: ModelSpec, b: int) -> int:
    """Text encoder at inference: a few hidden-state widths of the prompt (tiny next to its weights)."""
    return 16 * model.text_len * model.text_dim * b * 2


def _span_lengths(size: int, tile: int, overlap: int) -> list[int]:
    """Lengths of the decode tiles along one axis (the pipeline's cut, ``geometry.tiles.tile_spans``)."""
    return [end - start for start, end in tile_spans(size, tile, overlap)]


def decode_tiles(geo: _Geometry, run: RunSettings) -> tuple[int, int, int]:
    """(tiles, latent cells of all tiles together, cells of the largest tile) of the tiled decode."""
    lat_h, lat_w = geo.grid.h * 2, geo.grid.w * 2  # latent cells (patch 2x2)
    hs = _span_lengths(lat_h, run.decode_tile, run.decode_overlap)
    ws = _span_lengths(lat_w, run.decode_tile, run.decode_overlap)
    return len(hs) * len(ws), sum(hs) * sum(ws), max(hs) * max(ws)


def _decode_groups(geo: _Geometry, run: RunSettings, ranks: int) -> list[tuple[int, int]]:
    """(cells of one tile, tiles) of the largest decode call per tile shape on any rank: a rank decodes the tiles
    the area balance gives it (``geometry.tiles.balance_by_area``, as ``runtime.decode.assign_tiles``) and stacks
    at most ``decode_batch`` equal-shaped ones of them in one call (``pipeline.decode.tile_groups``)."""
    most: dict[tuple[int, int], int] = {}
    for shapes in _rank_tile_shapes(geo, run, ranks):
        for shape, n in Counter(shapes).items():
            most[shape] = max(most.get(shape, 0), min(n, run.decode_batch))
    return [(a * b, n) for (a, b), n in most.items()]


def _rank_tile_shapes(geo: _Geometry, run: RunSettings, ranks: int) -> list[list[tuple[int, int]]]:
    """(height, width) in latent cells of every decode tile of every rank, as the area balance deals them
    (``geometry.tiles.balance_by_area``, as ``runtime.decode.assign_tiles``)."""
    lat_h, lat_w = geo.grid.h * 2, geo.grid.w * 2  # latent cells (patch 2x2)
    hs = _span_lengths(lat_h, run.decode_tile, run.decode_overlap)
    ws = _span_lengths(lat_w, run.decode_tile, run.decode_overlap)
    shapes = [(a, b) for a in hs for b in ws]  # row-major, as pipeline.decode.plan_tiles
    return [[shapes[i] for i in ids] for ids in balance_by_area([a * b for a, b in shapes], ranks)]


def _decode_cache_bytes(geo: _Geometry, run: RunSettings, model: ModelSpec, ranks: int, order: str) -> int:
    """The causal caches a rank holds while decoding. 'together': the caches of all its tiles (tiles are balanced
    over the ranks by area, so at most its share of all tile cells plus one tile, the greedy balance's bound);
    'sequential': those of the largest call's tiles (:func:`_decode_cells`)."""
    return _decode_cells(geo, run, ranks, order) * model.vae_decode.state_bytes_per_cell


def _decode_cells(geo: _Geometry, run: RunSettings, ranks: int, order: str) -> int:
    """Latent cells of the tiles a rank has in flight at once: all its tiles ('together'; at most its share of all
    tile cells plus one tile, the greedy balance's bound), or the largest call's ('sequential')."""
    _, cells, largest = decode_tiles(geo, run)
    if order == "sequential":
        return max(c * n for c, n in _decode_groups(geo, run, ranks))
    return cells if ranks == 1 else min(cells, -(-cells // ranks) + largest)


#: Video frames one latent frame decodes to (the Wan VAE's temporal factor; the first latent frame gives one).
VAE_FRAMES_PER_LATENT = 4

#: Decoded chunks per tile a rank's decode stream may leave in Ray's object store before the driver takes them
#: (the streaming generator's backpressure, ``runtime.decode``); the store's pages a rank writes count in its RSS.
DECODE_CHUNKS_IN_STORE = 2


def _store_cells(geo: _Geometry, run: RunSettings, ranks: int, order: str) -> int:
    """Latent cells whose decoded chunks a rank may have in the object store at once (the backpressure's
    ``DECODE_CHUNKS_IN_STORE`` objects per tile it decodes): that many chunks of each of its tiles when they
    advance together (the stream yields one chunk of each in turn), of its largest tile when they go one group
    after another."""
    cells = [[a * b for a, b in shapes] for shapes in _rank_tile_shapes(geo, run, ranks) if shapes]
    if order == "together":
        return DECODE_CHUNKS_IN_STORE * max(sum(c) for c in cells)
    return DECODE_CHUNKS_IN_STORE * max(len(c) * max(c) for c in cells)


def _decode_host_bytes(geo: _Geometry, run: RunSettings, model: ModelSpec, ranks: int, order: str) -> dict:
    """What a decode keeps in host memory besides the VAE's tensors (on CPU the same memory): the latents (the
    whole latent, and each group's tiles cut from it and stacked, ``pipeline.decode._TileDecoder``), each tile's
    decoded chunk (fp32 pixels of one latent frame's video frames) until it is blended or streamed, and on one
    process the blender's fp32 frames (``TileBlender``: one chunk's frames while the tiles advance together, the
    whole clip's when they go group after group). On ranks the driver blends, and the chunks a rank streams sit in
    Ray's object store until the driver takes them (:func:`_store_cells`)."""
    mine = _decode_cells(geo, run, ranks, order)
    lat_cells = geo.grid.h * 2 * geo.grid.w * 2
    latent = model.in_channels * geo.grid.t * LATENT_CHANNELS_BYTES  # one latent cell over time
    cell_frame = 64 * 3 * 4  # one latent cell in one video frame: 8 x 8 pixels, RGB fp32
    chunk = VAE_FRAMES_PER_LATENT * cell_frame  # one latent cell's decoded chunk
    out = {"latents": (lat_cells + mine) * latent, "decoded_chunks": mine * chunk}
    if ranks > 1:
        out["store_chunks"] = _store_cells(geo, run, ranks, order) * chunk
    if ranks == 1:
        frames = VAE_FRAMES_PER_LATENT if order == "together" else (geo.grid.t - 1) * VAE_FRAMES_PER_LATENT + 1
        out["blended_frames"] = frames * lat_cells * cell_frame
    return out


def _decode_call_bytes(geo: _Geometry, run: RunSettings, model: ModelSpec, prof: DeviceProfile, ranks: int) -> dict:
    """Peak of one decode call (the largest over the tile shapes: tiles stacked times a tile's), split in the
    VAE's traced activations per tile pixel and the convolution library's workspace (the profile's multiple of the
    largest convolution's input + output per pixel)."""
    cost = model.vae_decode
    px = max(c * n for c, n in _decode_groups(geo, run, ranks)) * 64  # 8 x 8 pixels per latent cell
    return {
        "activations": int(px * cost.bytes_per_tile_pixel),
        "conv_workspace": int(px * prof.conv_workspace * cost.conv_io_bytes_per_tile_pixel),
    }


# -- communication --------------------------------------------------------------------------------------------
def _seq_parallel_bytes(tokens: int, d: int, b: int, degree: int, kind: str) -> float:
    """Bytes one rank receives per layer when ``degree`` ranks share a sequence of ``tokens``.

    Ulysses: four all-to-alls (q, k, v in; output back), each moving (degree-1)/degree of the rank's shard.
    Ring: keys and values of every other shard pass through the rank.
    """
    if degree == 1:
        return 0.0
    shard_bytes = tokens / degree * d * b
    if kind == "ulysses":
        return 4 * shard_bytes * (degree - 1) / degree
    return 2 * shard_bytes * (degree - 1)


def _across_fraction(degree: int, plan: ParallelPlan) -> float:
    """Part of an all-to-all / ring over ``degree`` consecutive ranks that goes to other nodes (InfiniBand)."""
    per_node = min(degree, plan.gpus_per_node)
    return 0.0 if degree <= 1 else (degree - per_node) / (degree - 1)


def _comm(geo, model, method, plan, run, b, shares) -> dict:
    d, L, passes = model.dim, model.num_layers, run.passes
    halo = remote = split = ultra = 0.0
    if geo.base is None:
        split = L * _seq_parallel_bytes(geo.grid.size, d, b, plan.workers, plan.window_parallel)
        remote = split * _across_fraction(plan.workers, plan)
    else:
        rows, rows_remote = _shift_rows(shares)  # the heaviest group's, shared by its window_group ranks
        halo, remote = rows * d * b / plan.window_group, rows_remote * d * b / plan.window_group
        for _, n, sh in shares["layers"]:
            wsplit = n * _seq_parallel_bytes(sh.tokens, d, b, plan.window_group, plan.window_parallel)
            split += wsplit
            remote += wsplit * _across_fraction(plan.window_group, plan)
            if method.mode == "ultragen" and plan.num_window_groups > 1:
                g = plan.num_window_groups
                layer_ultra = n * 2 * pooled_tokens(method, geo.grid) * d * b * (g - 1) / g / plan.window_group
                ultra += layer_ultra
                remote += layer_ultra * _across_fraction(plan.workers, plan)
    step = {"halo": int(passes * halo), "window_split": int(passes * split), "ultragen_global": int(passes * ultra)}
    step["total"] = sum(step.values())
    step["across_nodes"] = min(int(passes * remote), step["total"])  # part of the total, over InfiniBand
    proxy_step = 0
    once = {"text_embeddings": 2 * model.text_len * model.text_dim * b * max(0, plan.workers - 1)}
    if geo.proxy is not None:
        kind = "ring" if plan.proxy_parallel == "ring" else "ulysses"
        proxy_step = int(passes * L * _seq_parallel_bytes(geo.proxy.size, d, b, plan.proxy_degree, kind))
        proxy_latent = geo.proxy.size * model.in_channels * math.prod(model.patch) * LATENT_CHANNELS_BYTES
        once["proxy_latent"] = proxy_latent * max(0, plan.workers - 1)
    return {
        "step": step,
        "proxy_step": proxy_step,
        "once": once,
        "proxy_step_across": int(proxy_step * _across_fraction(plan.proxy_degree, plan)),
    }


def _link_seconds(total: float, across: float, prof: DeviceProfile) -> float:
    """Seconds to receive ``total`` bytes of which ``across`` come from other nodes (NVLink / InfiniBand)."""
    return (total - across) / prof.nvlink_bytes_per_s + across / prof.ib_bytes_per_s


# -- time -----------------------------------------------------------------------------------------------------
def _seconds(geo, model, method, plan, run, prof: DeviceProfile, flops, comm, dtype) -> dict:
    peak = prof.peak_flops_fp32 if dtype == "fp32" else prof.peak_flops
    dense = peak * prof.efficiency
    out = {"text_encoder": flops["video"]["text_encoder"] / dense}
    if geo.proxy is not None:
        per_step = flops["step"]["proxy"] / plan.proxy_degree / dense + _link_seconds(
            comm["proxy_step"], comm["proxy_step_across"], prof
        )
        out["proxy_stage"] = per_step * run.proxy_steps
        out["proxy_cache"] = flops["video"]["proxy_cache"] / plan.workers / dense
    rank_attn = flops["rank_attention"] if geo.base is not None else 0
    rank_other = flops["step"]["detail_per_rank"] - rank_attn
    attn_eff = peak * (prof.window_efficiency if geo.base is not None else prof.efficiency)
    step = (
        rank_other / dense
        + rank_attn / attn_eff
        + _link_seconds(comm["step"]["total"], comm["step"]["across_nodes"], prof)
    )
    out["detail_step"] = step
    out["detail_stage"] = step / run.passes * run.detail_forwards
    out["vae_decode"] = flops["video"]["vae_decode"] / plan.workers / (prof.peak_flops_fp32 * prof.efficiency)
    out["total"] = sum(v for k, v in out.items() if k != "detail_step")
    return out


# -- verdict --------------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def _reasons(report: CostReport, video, model, method, plan, run, prof, dtype, suggest) -> list[str]:
    usable = report.memory_usable_bytes
    where = f"{_gib(prof.memory_bytes)} x {prof.usable_fraction:g} usable on {prof.name}" + (
        f", shared by {plan.workers} workers" if prof.shared_memory else ""
    )
    out = []
    for phase, parts in report.memory.items():
        if parts["total"] <= usable:
            continue
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if k != "total")
        out.append(f"{phase} needs {_gib(parts['total'])} per rank ({detail}) > {_gib(usable)} ({where})")
    hints = []
    if not report.fits and suggest:
        hints.append(_levers_hint(video, model, method, plan, run, prof))
    if report.memory["detail_stage"]["total"] > usable and suggest:
        hints.append(_more_workers_hint(report, video, model, method, plan, run, prof))
    if dtype == "fp32":
        hints.append("--dtype bf16 halves weights and activations")
    if method.proxy_context == "all" and method.mode == "atlas":
        hints.append("--proxy-context aligned caches only the proxy keys each window reads")
    if method.proxy_mode == "joint":
        hints.append("proxy_mode 'clean' runs the proxy once instead of inside every forward")
    if prof.name == "h100" and report.memory_per_rank_bytes <= device_profile("h200").usable_bytes:
        hints.append("--device-profile h200 (141 GB) holds it")
    out.extend(h for h in hints if h)
    return out


#: Memory levers the plan tries on the same ranks when a run does not fit, in this order (RunSettings fields).
MEMORY_LEVERS = (
    {"offload_encoders": True},
    {"ffn_chunk_tokens": 32768},
    {"offload_encoders": True, "ffn_chunk_tokens": 32768},
    {"offload_encoders": True, "ffn_chunk_tokens": 8192},
)


def _lever_flags(lever: dict) -> str:
    return " ".join("--offload-encoders" if k == "offload_encoders" else f"--ffn-chunk {v}" for k, v in lever.items())


def _levers_hint(video, model, method, plan, run, prof) -> str | None:
    """The first of :data:`MEMORY_LEVERS` not already set that makes every phase fit on these ranks."""
    for lever in MEMORY_LEVERS:
        if all(getattr(run, k) == v for k, v in lever.items()):
            continue
        r = estimate(video, model, method, plan, dataclasses.replace(run, **lever), prof, suggest=False)
        if r.fits:
            return f"{_lever_flags(lever)} fits on these ranks ({_gib(r.memory_per_rank_bytes)} per rank)"
    return None


def _more_workers_hint(report, video, model, method, plan, run, prof) -> str:
    """The smallest worker count (doubling, within the windows) whose detail stage fits, or why none does."""
    limit = report.num_windows * plan.window_group if report.num_windows else model.num_heads
    w = plan.workers * 2
    while w <= max(limit, 1) and w <= 1024:
        try:
            alt = dataclasses.replace(plan, workers=w, gpus=max(plan.gpus, w) if plan.device == "cuda" else plan.gpus)
            r = estimate(video, model, method, alt, run, prof, suggest=False)
            if r.proxy_tokens:  # a count the runtime refuses is no suggestion
                alt.check_proxy_split(r.proxy_tokens, model.num_heads)
        except Exception:  # a worker count the plan cannot carry (heads, windows): try the next one
            w *= 2
            continue
        if r.memory["detail_stage"]["total"] <= r.memory_usable_bytes:
            return (
                f"--gpus {w} fits the detail stage ({_gib(r.memory['detail_stage']['total'])} per rank"
                + ("" if r.fits else "; other phases still need attention")
                + ")"
            )
        w *= 2
    fixed = {"weights": report.memory["detail_stage"]["weights"]}
    if method.proxy_context == "all" and "proxy_kv_cache" in report.memory["detail_stage"]:
        fixed["the whole proxy K/V cache"] = report.memory["detail_stage"]["proxy_kv_cache"]
    if "proxy_kv_joint" in report.memory["detail_stage"]:
        fixed["the proxy rows of every forward (proxy_mode 'joint')"] = report.memory["detail_stage"]["proxy_kv_joint"]
    parts = " and ".join(f"{k} ({_gib(v)})" for k, v in fixed.items())
    return (
        f"no worker count up to {min(limit, 1024)} fits: every rank holds the {parts} whatever the rank count; "
        f"use a device with more memory, or --window-group to split windows"
    )


def _notes(
    video: VideoSpec, geo: _Geometry, model: ModelSpec, method: AtlasConfig, plan: ParallelPlan, dtype: str
) -> list[str]:
    notes = []
    if video.cropped:
        notes.append(
            f"generated at {video.gen_width}x{video.gen_height} and cropped to {video.width}x{video.height} "
            f"when decoded"
        )
    if geo.proxy is not None and (geo.grid.t - 1) % method.temporal_scale:
        notes.append(
            f"the proxy has {geo.proxy.t} latent frames and extends past the clip's last frame "
            f"((f - 1) = {geo.grid.t - 1} is not a multiple of temporal_scale = {method.temporal_scale})"
        )
    padded = [spec for spec, _ in geo.specs if spec.padded]
    if padded:
        notes.append(
            f"{len(padded)} of {len(geo.specs)} layer grids have partial windows (run at their real lengths, no padding computed)"
        )
    if geo.proxy is not None and plan.workers > 1 and plan.proxy_parallel == "none":
        notes.append(_idle_stage1_note(geo.proxy.size, model.num_heads, plan.workers))
    if dtype == "fp32" and plan.device == "cuda":
        notes.append("fp32 on CUDA: bf16 is about twice as fast and half the memory")
    notes.append(
        "text encoder and VAE decode FLOPs, decode memory and all seconds are estimates "
        "(seconds are a lower bound: memory-bound work is not modelled)"
    )
    return notes


def _idle_stage1_note(proxy_tokens: int, heads: int, workers: int) -> str:
    """Stage 1 on one rank while the others wait, and the --proxy-parallel modes the runtime would run instead."""
    modes = runnable_proxy_parallel(proxy_tokens, heads, workers)
    note = f"stage 1 runs on one rank while {workers - 1} wait"
    if not modes:
        return note + f" (its {proxy_tokens} tokens do not split over {workers} ranks)"
    return note + ": --proxy-parallel " + " or ".join(modes) + " spreads it"


def _run_notes(run: RunSettings) -> list[str]:
    if not run.detail_reuse:
        return []
    return [
        f"detail_reuse {run.detail_reuse:g}: the first-block cache skips forwards decided at run time; the detail "
        f"stage's seconds and FLOPs here count all {run.detail_forwards} forwards as run in full"
    ]


def _inputs(video, model, method, plan, run, prof, dtype) -> dict:
    return {
        "video": {
            "width": video.width,
            "height": video.height,
            "frames": video.frames,
            "fps": video.fps,
            "gen_width": video.gen_width,
            "gen_height": video.gen_height,
        },
        "model": model.name,
        "method": dataclasses.asdict(method),
        "parallel": dataclasses.asdict(plan),
        "run": dataclasses.asdict(run),
        "dtype": dtype,
        "device_profile": dataclasses.asdict(prof),
    }
