"""The two denoising stages, written once, run by one process and by every Ray rank alike.

A stage owns what makes it that stage: its model (stage 1 with full attention, stage 2 with the method's), its
LoRA adapter, its seed (stage 1 ``seed``, stage 2 ``seed + 1``), its sampler settings, its starting latents (stage
2 optionally from the upsampled proxy), the classifier-free-guidance velocity and the denoising loop. What differs
between one process and a rank is only the *token layout* it is given: which share of the latent this process
holds and how the model's forward runs on that share. :class:`WholeGrid` is one process's (the whole latent);
``runtime/proxy.py`` and ``runtime/detail.py`` hold a rank's (a slice of the proxy tokens, a rank's windows).

Usage (what ``TwoStageGenerator`` and the ranks do)::

    stage = DetailStage(cfg, comp, text, proxy, device, dtype)
    layout = stage.whole_grid()            # or a rank's layout
    state = stage.start(layout)            # seeded noise (proxy-initialised), scheduler, step 0
    state.restore(saved, device, dtype)    # optional: continue a committed step
    latents = stage.denoise(state, layout, on_step)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..config.method import AtlasConfig
from ..models.block_cache import FirstBlockCache
from . import sampling
from .checkpoint import generator_state, restore_generator
from .text import TextEmbeddings

KINDS = ("cond", "uncond")
"""The prompts a forward runs for: the prompt, and the negative prompt when guidance is on."""


# ------------------------------------------------------------------------------------------------ state
@dataclass
class SavedStep:
    """A committed step as loaded from a checkpoint: what a stage resumes from."""

    step: int
    """Steps done when it was committed."""
    tensors: dict
    """``latents``, ``rng`` and the scheduler's ``sched.*`` tensors (one process, stage 2: also ``proxy``)."""
    meta: dict
    """The commit's meta: ``step`` and ``sched`` (one process: also ``stage``)."""

    @property
    def stage(self) -> str | None:
        """The stage it belongs to ("proxy" / "detail"); None in a rank's checkpoint (stage 2 only)."""
        return self.meta.get("stage")


@dataclass
class StageState:
    """A stage's denoising state between two steps: everything a checkpoint holds."""

    latents: torch.Tensor
    """The latents of the layout's share: the whole (1, C, f, h, w), or a rank's strip (1, C, pt, ph, n*pw)."""
    scheduler: object
    """The diffusers scheduler, holding the state of step :attr:`step`."""
    generator: torch.Generator
    """The stage's RNG: it drew the initial noise; stage 2 in proxy_mode 'joint' draws each forward's proxy noise."""
    step: int = 0
    """Steps done: the next step to run."""
    caches: dict[str, FirstBlockCache] = field(default_factory=dict)
    """First-block caches by prompt kind (stage 2 with ``detail_reuse``; empty otherwise)."""

    def checkpoint(self) -> tuple[dict, dict]:
        """(tensors, meta) to commit: scheduler state, latents, generator state, first-block caches; meta
        ``{"step", "sched"}`` (and ``"caches"`` when there are any)."""
        tensors, sched = sampling.scheduler_state(self.scheduler)
        tensors = {**tensors, "latents": self.latents.detach().cpu().clone(), "rng": generator_state(self.generator)}
        meta = {"step": self.step, "sched": sched}
        if self.caches:
            meta["caches"] = {}
            for kind, cache in self.caches.items():
                t, meta["caches"][kind] = cache.state(f"cache.{kind}")
                tensors.update(t)
        return tensors, meta

    def restore(self, saved: SavedStep, device, dtype) -> None:
        """Continue from ``saved`` (scheduler, latents, step; the generator too when saved: a rank checkpoint
        written before ranks kept it has none, and then only proxy_mode 'clean' ran, which draws nothing)."""
        sched = {k: v for k, v in saved.tensors.items() if k.startswith("sched.")}
        sampling.restore_scheduler(self.scheduler, sched, saved.meta["sched"])
        if "rng" in saved.tensors:
            restore_generator(self.generator, saved.tensors["rng"])
        self.latents = saved.tensors["latents"].to(device, dtype)
        self.step = saved.step
        for kind, cache in self.caches.items():
            cache.restore(saved.tensors, saved.meta["caches"][kind], f"cache.{kind}", device, dtype)


@dataclass
class ProxyInput:
    """What one stage-2 forward reads of the proxy (None instead of one: no proxy)."""

    cache: object | None = None
    """proxy_mode 'clean': this prompt's ProxyCache (the clean proxy's keys/values)."""
    proxy: torch.Tensor | None = None
    """proxy_mode 'joint': the clean proxy latent (1, C, f_p, h_p, w_p), re-noised by the forward."""
    noise: torch.Tensor | None = None
    """proxy_mode 'joint': this forward's proxy noise, drawn from the stage's generator."""


class TokenLayout(Protocol):
    """The share of the tokens one process denoises, and the model's forward on that share."""

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole latent (1, C, f, h, w) -> this layout's share of it."""

    def forward(
        self, kind: str, x, t, emb: torch.Tensor, proxy: ProxyInput | None, cache: FirstBlockCache | None = None
    ) -> torch.Tensor:
        """The velocity of ``x`` (this layout's share) at ``t`` for prompt ``kind`` (its embedding ``emb``),
        skipping blocks as ``cache`` allows."""

    def all_sum(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` added over every process holding a share of the tokens (a collective on a rank); needed by
        the layouts of a stage that keeps first-block caches (stage 2)."""


class WholeGrid:
    """One process's layout: the whole latent, the model's own forward (``fn``: AtlasTransformer's
    ``proxy_forward`` in stage 1, its ``forward`` in stage 2)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def take(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def forward(self, kind: str, x, t, emb: torch.Tensor, proxy: ProxyInput | None, cache=None) -> torch.Tensor:
        kw = {} if cache is None else {"block_cache": cache}
        if proxy is None:
            return self.fn(x, t, emb, **kw)
        if proxy.cache is not None:
            return self.fn(x, t, emb, proxy_cache=proxy.cache, **kw)
        return self.fn(x, t, emb, proxy=proxy.proxy, proxy_noise=proxy.noise, **kw)

    def all_sum(self, sums: torch.Tensor) -> torch.Tensor:
        return sums


# ------------------------------------------------------------------------------------------------ stages
def activate_adapter(cfg, transformer, name: str) -> None:
    """Make the LoRA adapter of stage ``name`` ("stage1" / "stage2") the active one (none when not given)."""
    from ..models import lora

    path = {"stage1": cfg.lora_stage1, "stage2": cfg.lora_stage2}[name]
    lora.set_active_adapter(transformer, name if path else None)


def proxy_caches(cfg, model, proxy: torch.Tensor, text: TextEmbeddings, keep=None) -> dict:
    """The clean proxy's keys/values per prompt ("cond", "uncond"), built by the stage-1 model (its adapter
    active, base weights without one): the same function stage-2 training uses (pipeline/proxy_cache.py).
    ``keep(layer)``: the proxy rows to keep of each layer (a rank's windows'); None keeps all."""
    from .proxy_cache import proxy_cache_for

    adapter = "stage1" if cfg.lora_stage1 else None
    embs = zip(KINDS, (text.cond, text.uncond))
    return {k: proxy_cache_for(model, proxy, e, adapter, keep) for k, e in embs if e is not None}


class Stage:
    """What both stages share: seeded noise over the whole latent, the CFG velocity, the denoising loop."""

    name: str
    """The stage's name, "proxy" or "detail" (progress lines, step times, checkpoint keys)."""
    seed_offset: int
    """Added to the run's seed for this stage's generator."""

    def __init__(self, cfg, comp, text: TextEmbeddings, device, dtype):
        self.cfg, self.comp, self.text = cfg, comp, text
        self.device, self.dtype = device, dtype
        self.model = None  # set by the stage: an AtlasTransformer

    @property
    def kinds(self) -> list[str]:
        """The prompts each velocity runs ("cond", and "uncond" with guidance)."""
        return [k for k in KINDS if getattr(self.text, k) is not None]

    def shape(self) -> tuple[int, ...]:
        """The whole latent's shape (1, C, f, h, w)."""
        raise NotImplementedError

    def sampler(self) -> sampling.SamplerConfig:
        """This stage's steps, guidance scale and flow shift."""
        raise NotImplementedError

    def proxy_input(self, kind: str, x: torch.Tensor, generator: torch.Generator) -> ProxyInput | None:
        """What a forward of prompt ``kind`` on ``x`` reads of the proxy (stage 1: nothing)."""
        return None

    def whole_grid(self) -> WholeGrid:
        """One process's layout of this stage."""
        raise NotImplementedError

    def start(self, layout: TokenLayout) -> StageState:
        """Step 0: the stage's seeded noise over the whole latent, ``layout``'s share of it, a fresh scheduler."""
        gen = torch.Generator().manual_seed(self.cfg.seed + self.seed_offset)
        noise = torch.randn(self.shape(), generator=gen).to(self.device, self.dtype)
        sched = sampling.start_scheduler(self.comp.scheduler, self.sampler(), self.device)
        state = self._initial(StageState(noise, sched, gen, caches=self.block_caches(layout)))
        state.latents = layout.take(state.latents)
        return state

    def block_caches(self, layout: TokenLayout) -> dict[str, FirstBlockCache]:
        """First-block caches by prompt kind (none unless the stage reuses blocks)."""
        return {}

    def guidance_min_t(self, scheduler) -> float | None:
        """Lowest timestep that runs guidance (None: every step)."""
        return None

    def _initial(self, state: StageState) -> StageState:
        return state

    def velocity(self, layout: TokenLayout, state: StageState) -> sampling.Velocity:
        """Classifier-free guidance over ``layout``'s forward: cond, then uncond (this order draws the noise);
        uncond only down to :meth:`guidance_min_t`."""

        def forward(kind):
            emb, cache = getattr(self.text, kind), state.caches.get(kind)
            return lambda x, t: layout.forward(kind, x, t, emb, self.proxy_input(kind, x, state.generator), cache)

        uncond = forward("uncond") if self.text.uncond is not None else None
        min_t = self.guidance_min_t(state.scheduler)
        return sampling.guided(forward("cond"), uncond, self.sampler().guidance, min_t)

    def denoise(
        self, state: StageState, layout: TokenLayout, on_step: Callable[[StageState], None] | None = None
    ) -> torch.Tensor:
        """Run the steps left from ``state`` (updated in place); ``on_step(state)`` after each step."""
        velocity = self.velocity(layout, state)

        def hook(done, latents, _sched):
            state.latents, state.step = latents, done
            if on_step is not None:
                on_step(state)

        steps = self.sampler().steps
        with torch.no_grad():
            state.latents = sampling.denoise(
                velocity, state.latents, state.scheduler, steps, start=state.step, on_step=hook
            )
        return state.latents


class ProxyStage(Stage):
    """Stage 1: the proxy latent, full attention with temporally scaled RoPE, the stage-1 adapter."""

    name, seed_offset = "proxy", 0

    def __init__(self, cfg, comp, text: TextEmbeddings, device, dtype):
        from ..models.atlas_transformer import AtlasTransformer

        super().__init__(cfg, comp, text, device, dtype)
        activate_adapter(cfg, comp.transformer, "stage1")
        method = AtlasConfig(**{**cfg.method.__dict__, "mode": "full"})
        self.model = AtlasTransformer(comp.transformer, method, cfg.ffn_chunk, cfg.compile_blocks)

    def shape(self) -> tuple[int, ...]:
        g = self.cfg.proxy.grid  # proxy tokens; a token is 1 x 2 x 2 latent cells
        return (1, self.comp.transformer.config.in_channels, g.t, g.h * 2, g.w * 2)

    def sampler(self) -> sampling.SamplerConfig:
        return sampling.SamplerConfig(self.cfg.proxy_steps, self.cfg.guidance, self.cfg.proxy_flow_shift)

    def whole_grid(self) -> WholeGrid:
        return WholeGrid(self.model.proxy_forward)


class DetailStage(Stage):
    """Stage 2: the detail latent, the method's attention reading the proxy, the stage-2 adapter.

    proxy_mode 'clean' reads the clean proxy's keys/values (:attr:`caches`, built once by the stage-1 model);
    'joint' re-noises the proxy at every forward with noise drawn from the stage's generator (cond, then uncond).
    """

    name, seed_offset = "detail", 1

    def __init__(
        self, cfg, comp, text: TextEmbeddings, proxy: torch.Tensor | None, device, dtype, build_caches: bool = True
    ):
        """``build_caches=False``: the caller calls :meth:`build_caches` itself (a rank, to keep its rows only)."""
        from ..models.atlas_transformer import AtlasTransformer

        super().__init__(cfg, comp, text, device, dtype)
        self.proxy = proxy
        self.model = AtlasTransformer(comp.transformer, cfg.method, cfg.ffn_chunk, cfg.compile_blocks)
        self.caches = {}
        """Clean proxy keys/values by prompt kind (empty: no proxy, or proxy_mode 'joint')."""
        if build_caches:
            self.build_caches()
        else:
            activate_adapter(cfg, comp.transformer, "stage2")

    def build_caches(self, keep=None) -> None:
        """proxy_mode 'clean': build :attr:`caches` (``keep(layer)``: each layer's proxy rows to keep, None: all);
        then make the stage-2 adapter the active one."""
        if self.proxy is not None and not self.joint:
            self.caches = proxy_caches(self.cfg, self.model, self.proxy.to(self.device, self.dtype), self.text, keep)
        activate_adapter(self.cfg, self.comp.transformer, "stage2")

    @property
    def joint(self) -> bool:
        """True when every forward re-noises the proxy (proxy_mode 'joint')."""
        return self.proxy is not None and self.cfg.method.proxy_mode == "joint"

    def shape(self) -> tuple[int, ...]:
        return (1, self.comp.transformer.config.in_channels, *self.cfg.latent.dims)

    def sampler(self) -> sampling.SamplerConfig:
        return sampling.SamplerConfig(self.cfg.steps, self.cfg.guidance, self.cfg.flow_shift)

    def whole_grid(self) -> WholeGrid:
        return WholeGrid(self.model)

    def forwards(self, state: StageState) -> dict[str, int]:
        """The stage's forwards over the whole run: ``total`` (the schedule's) and ``reused`` (by the caches)."""
        total = self.cfg.detail_schedule.forwards(len(self.kinds) == 2)
        return {"total": total, "reused": sum(c.reused for c in state.caches.values())}

    def block_caches(self, layout: TokenLayout) -> dict[str, FirstBlockCache]:
        if not self.cfg.detail_reuse:
            return {}
        return {k: FirstBlockCache(self.cfg.detail_reuse, layout.all_sum) for k in self.kinds}

    def guidance_min_t(self, scheduler) -> float | None:
        """CFG truncation: guidance at the steps before the schedule's ``guided_until`` (by their timesteps,
        which fall step by step)."""
        until = self.cfg.detail_schedule.guided_until
        if until >= self.cfg.steps:
            return None
        return float(scheduler.timesteps[until - 1]) if until > 0 else float("inf")

    def proxy_input(self, kind: str, x: torch.Tensor, generator: torch.Generator) -> ProxyInput | None:
        if self.proxy is None:
            return None
        if not self.joint:
            return ProxyInput(cache=self.caches[kind])
        noise = torch.randn(self.proxy.shape, generator=generator).to(x)
        return ProxyInput(proxy=self.proxy, noise=noise)

    def _initial(self, state: StageState) -> StageState:
        if self.cfg.detail_init == "proxy":
            state.step, state.latents = self._proxy_init(state.latents, state.scheduler)
        return state

    def _proxy_init(self, noise: torch.Tensor, sched) -> tuple[int, torch.Tensor]:
        """Start from the proxy upsampled to the detail grid, noised to init_strength: (first step, latents).

        The upsampling places proxy cells with the same anchor as the proxy keys' RoPE (ProxyAnchor): proxy frame j
        on detail latent frame j * r_t, proxy cell i at the centre of the s x s detail block it covers (linear in
        between; in space this is bilinear with align_corners=False). Runs the last round(steps * init_strength)
        steps (at least one), starting at that step's sigma (the scheduler begins there).
        """
        from ..geometry.grid import ProxyAnchor, upsample_proxy

        cfg = self.cfg
        start = cfg.detail_schedule.start
        anchor = ProxyAnchor(cfg.method.temporal_scale, cfg.method.spatial_scale)
        up = upsample_proxy(self.proxy, anchor, cfg.latent.dims)  # (1, C, f, h, w)
        sigma = float(sched.sigmas[start])
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        return start, ((1.0 - sigma) * up + sigma * noise.float()).to(noise.dtype)
