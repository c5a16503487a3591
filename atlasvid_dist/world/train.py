"""`atlasvid-dist world train`: train the shapes model from scratch on clips of the shapes world rendered on the
fly, and save it as a diffusers-format Wan2.1 folder that ``load_components`` and ``generate --model`` read.

Stages (each checkpointed under OUTPUT/checkpoints/<stage>, resumable, timed):

- ``vae``: a small AutoencoderKLWan (world/model.py, He-initialised) learns to reconstruct world clips: MSE of the
  posterior mean's reconstruction, weighted up on object pixels, plus a small KL, on windows of base-size clips
  (whole frames in the full budget; crops near the object where vae_crop is smaller than the frame).
- ``vae_decoder``: the VAE's decoder alone (the encoder frozen, so the latents and all that trains on them are
  unchanged) on windows of clips rendered at 1, 2 and 4x the base size and 1, 2 and 4x its length, cropped over the
  object's edge or interior: the large, slowly moving interiors of generate's output sizes, which the base-size
  crops never show (the VAE alone splits them on the first frame of every group of four, docs/shapes.md).
- ``vae_decoder_base``: then the decoder alone on windows of base-size clips only, where the object's corners are
  a few pixels and the evaluator reads the shape from them.
- ``latents``: a pool of world clips (every caption x a few start seeds, none of them the evaluation seeds) encoded
  once with the trained VAE (posterior mean); the per-channel mean and std become the VAE's latents_mean /
  latents_std, so the transformer sees Wan-normalised latents exactly as generate and `train` do.
- ``dit``: a small WanTransformer3DModel trained from scratch with Wan's flow matching (x_t = (1 - s) x0 + s eps,
  v = eps - x0 at timestep 1000 s, s uniform then shifted by FLOW_SHIFT via train.train.sample_sigma), text from a
  frozen random UMT5 over a word-level tokenizer; 10% of the captions are dropped to the empty prompt so
  classifier-free guidance has an unconditional model.
- ``lora1`` / ``lora2`` (world/adapters.py): the AtlasVid adapters on the exported base, each by
  `atlasvid-dist train` (DeepSpeed, 2 processes) on 65-frame world clips, saved into the folder and named by its
  defaults.

Everything a step draws comes from (seed, step), and Adam's moments are checkpointed, so a resumed run ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, check
from ..train.shards import chunked
from .adapters import TEMPORAL_SCALE, adapter_defaults, adapter_frames, train_adapter
from .checkpoint import (
    CHECKPOINTS,
    StageState,
    commit_stage,
    module_tensors,
    optimizer_tensors,
    read_stage,
    restore,
    stage_dir,
)
from .clips import WorldClip
from .model import (
    FLOW_SHIFT,
    SHAPES_TEXT_LEN,
    build_scheduler,
    build_text_encoder,
    build_transformer,
    build_vae,
    build_world_tokenizer,
    param_count,
    write_defaults,
)
from .render import centres_px, radius_px, render_frame
from .scene import BACKGROUND, all_scenes

RUN_JSON = "world_train.json"
"""The run's seed and budget, written first; a resume must ask for the same ones."""
POOL_SEED_BASE = 1000
"""Training clips use start seeds from here on, so the evaluation seeds (0, 1, 2) are never trained on."""
CAPTION_DROPOUT = 0.1
"""Fraction of transformer examples trained with the empty prompt (unconditional, for guidance)."""


@dataclass(frozen=True)
class WorldBudget:
    """Sizes and step counts of one `world train` budget."""

    width: int
    """Base width in pixels (the transformer's training size)."""
    height: int
    """Base height in pixels."""
    frames: int
    """Clip length (4k+1)."""
    fps: float
    """Frame rate the clips are labelled with (the world's frames do not depend on it)."""
    vae_image_steps: int
    """VAE optimizer steps on single frames first (the causal VAE codes a clip's first frame alone, so these train
    its spatial path, where sharpness comes from, at a fraction of a window's cost)."""
    vae_image_batch: int
    """Frames per single-frame VAE step."""
    vae_steps: int
    """VAE optimizer steps on windows of vae_frames frames, after the single-frame steps."""
    vae_batch: int
    """Crops per VAE step."""
    vae_frames: int
    """Frames per VAE crop (4k+1; a window of a full clip, so motion per frame is as in training clips)."""
    vae_crop: int
    """Side of the square VAE crop in pixels (multiple of 8)."""
    vae_lr: float
    """Peak VAE learning rate (AdamW)."""
    pool_seeds: int
    """Start seeds per caption in the latent pool."""
    pool_scenes: int
    """Captions in the pool (the first N of the world's 32)."""
    dit_steps: int
    """Transformer optimizer steps."""
    dit_batch: int
    """Clips per transformer step."""
    dit_lr: float
    """Peak transformer learning rate (AdamW)."""
    adapter_scale: int
    """The adapters' clips are rendered at adapter_scale x the base size per side: stage 1 trains on their proxies (the
    base size), stage 2 on the clips themselves unless detail_scale is set."""
    adapter_clips: int
    """World clips (4(frames-1)+1 frames each) the stage-2 LoRA trains on; clip i depicts caption i mod 32."""
    lora_steps: int
    """Optimizer steps of the stage-2 LoRA, and of the stage-1 LoRA unless proxy_lora_steps is set (0: no
    adapters)."""
    lora_lr: float
    """Peak LoRA learning rate (cosine to 0)."""
    lora_rank: int
    """LoRA rank (alpha = rank)."""
    save_every: int
    """Checkpoint every N steps within a stage (0: at the end only)."""
    log_every: int
    """Print and log the loss every N steps."""
    dit_frame_steps: int = 0
    """Transformer optimizer steps on single frames before its clip steps (0: none). Frames 0, 4, 8, ... of every
    pool clip are encoded alone (as the causal VAE codes a clip's first frame), one latent frame per sample. The
    shape word is learnt late, with optimizer steps, and a step of single frames costs about a quarter of a step of
    clips (docs/shapes.md: 4800 such steps took a probe's single-frame shape from 50% to 75%)."""
    dit_frame_batch: int = 16
    """Single frames per transformer step of that phase."""
    vae_decoder_steps: int = 0
    """Decoder-only VAE steps after the VAE stage (0: none): vae_batch windows of vae_frames frames cropped to
    vae_crop px from clips at DECODER_SCALES x the base size and length, the encoder frozen."""
    vae_decoder_lr: float = 3e-4
    """Peak learning rate of the decoder-only steps."""
    vae_decoder_base_steps: int = 0
    """Decoder-only steps after those (stage ``vae_decoder_base``, its own schedule at vae_decoder_lr), on windows of
    base-size clips alone (scale and length 1): the mixed scales leave the base size's square corners soft, and
    the evaluator tells a square from a disc by them (docs/shapes.md)."""
    proxy_clips: int = 0
    """World clips the stage-1 (proxy) LoRA trains on (0: adapter_clips). Its 17-frame proxies cost a fraction of
    a stage-2 example, and with 16 clips (half the captions) its proxies kept one object in 22% of the 32 captions."""
    proxy_lora_steps: int = 0
    """Optimizer steps of the stage-1 LoRA (0: lora_steps)."""
    dit_heads: int = 4
    """Transformer attention heads (32 channels each): its width is 32 x dit_heads."""
    dit_ffn: int = 256
    """Transformer FFN width."""
    detail_scale: int = 0
    """Stage-2 LoRA training size = detail_scale x the base size per side (0: adapter_scale; stage 1 always reads
    adapter_scale's clips). At 2x an object (a third of the frame across) always fits in a base-size window, so
    windows never learn to lie inside one; at the 4x of generate's default job it is wider than a window, and a
    stage-2 adapter trained at 2x leaves holes and pieces there (docs/shapes.md)."""
    detail_frames: int = 0
    """Frames of each stage-2 training clip, cut from the middle of its 4(frames-1)+1-frame render (0: all of them,
    the clip generate's default job makes). A 17-frame cut at 4x has about the tokens of a whole clip at 2x, with
    the motion per frame of the whole clip."""

    def __post_init__(self) -> None:
        check(self.frames >= 1 and (self.frames - 1) % 4 == 0, "frames", self.frames, "must be 4k+1")
        check(
            (self.vae_frames - 1) % 4 == 0 and self.vae_frames <= self.frames,
            "vae_frames",
            self.vae_frames,
            "must be 4k+1 and at most frames",
        )
        check(
            self.width % 16 == 0 and self.height % 16 == 0,
            "width/height",
            (self.width, self.height),
            "must be multiples of 16 (8x VAE, 2x2 patches)",
        )
        check(
            self.vae_crop % 8 == 0 and self.vae_crop <= min(self.width, self.height),
            "vae_crop",
            self.vae_crop,
            "must be a multiple of 8 that fits the frame",
        )
        check(1 <= self.pool_scenes <= len(all_scenes()), "pool_scenes", self.pool_scenes, "must be in 1..32")
        check(self.vae_decoder_steps >= 0, "vae_decoder_steps", self.vae_decoder_steps, "must be >= 0")
        check(self.vae_decoder_base_steps >= 0, "vae_decoder_base_steps", self.vae_decoder_base_steps, "must be >= 0")
        check(self.proxy_clips >= 0, "proxy_clips", self.proxy_clips, "must be >= 0")
        check(self.proxy_lora_steps >= 0, "proxy_lora_steps", self.proxy_lora_steps, "must be >= 0")
        check(self.dit_frame_steps >= 0, "dit_frame_steps", self.dit_frame_steps, "must be >= 0")
        check(self.dit_frame_batch >= 1, "dit_frame_batch", self.dit_frame_batch, "must be >= 1")
        check(self.detail_scale >= 0, "detail_scale", self.detail_scale, "must be >= 0")
        check(
            self.detail_frames == 0
            or ((self.detail_frames - 1) % 4 == 0 and self.detail_frames <= 4 * self.frames - 3),
            "detail_frames",
            self.detail_frames,
            "must be 0 or 4k+1, at most the 4(frames-1)+1 frames of a stage-2 render",
        )
        check(
            self.dit_heads >= 1 and self.dit_ffn >= 1,
            "dit_heads/dit_ffn",
            (self.dit_heads, self.dit_ffn),
            "must be >= 1",
        )


FULL_BUDGET = WorldBudget(
    width=128,
    height=128,
    frames=17,
    fps=16.0,
    vae_image_steps=300,
    vae_image_batch=8,
    vae_steps=500,
    vae_batch=2,
    vae_frames=17,
    vae_crop=64,
    vae_lr=1e-3,
    vae_decoder_steps=400,
    vae_decoder_base_steps=400,
    pool_seeds=6,
    pool_scenes=32,
    dit_steps=2000,
    dit_batch=16,
    dit_frame_steps=4800,
    dit_frame_batch=16,
    dit_lr=1e-3,
    adapter_scale=2,
    adapter_clips=32,
    detail_scale=4,
    detail_frames=17,
    proxy_clips=128,
    lora_steps=450,
    proxy_lora_steps=2000,
    lora_lr=1e-3,
    lora_rank=16,
    save_every=100,
    log_every=50,
)
"""The recipe that made the shipped `shapes` model (seed 0)."""

BUDGETS = {
    "tiny": WorldBudget(
        width=64,
        height=64,
        frames=5,
        fps=16.0,
        vae_image_steps=1,
        vae_image_batch=2,
        vae_steps=2,
        vae_batch=1,
        vae_frames=5,
        vae_crop=32,
        vae_lr=1e-3,
        pool_seeds=1,
        pool_scenes=2,
        dit_steps=3,
        dit_batch=1,
        dit_lr=1e-3,
        adapter_scale=2,
        adapter_clips=2,
        detail_frames=5,
        proxy_clips=3,
        lora_steps=2,
        proxy_lora_steps=3,
        lora_lr=1e-3,
        lora_rank=4,
        save_every=0,
        log_every=1,
        dit_frame_steps=2,
        dit_frame_batch=2,
        vae_decoder_steps=1,
        vae_decoder_base_steps=1,
    ),
    "full": FULL_BUDGET,
    "wide": replace(
        FULL_BUDGET,
        vae_decoder_steps=0,
        vae_decoder_base_steps=0,
        dit_steps=600,
        dit_frame_steps=2400,
        dit_frame_batch=16,
        dit_heads=8,
        dit_ffn=1024,
    ),
    "short": WorldBudget(
        width=128,
        height=128,
        frames=17,
        fps=16.0,
        vae_image_steps=20,
        vae_image_batch=8,
        vae_steps=30,
        vae_batch=2,
        vae_frames=5,
        vae_crop=64,
        vae_lr=2e-3,
        pool_seeds=1,
        pool_scenes=32,
        dit_steps=60,
        dit_batch=4,
        dit_lr=1e-3,
        adapter_scale=2,
        adapter_clips=8,
        lora_steps=10,
        lora_lr=1e-3,
        lora_rank=16,
        save_every=10,
        log_every=10,
    ),
}
"""tiny: end to end in a few minutes (tests); short: the full recipe's sizes with few steps (a first look);
full: the real recipe, meant to fit an hour on 2 CPU cores (the shipped model); wide: full with a transformer of
twice the width and four times the FFN, 2400 single-frame steps before 600 clip steps (measured worse than full,
docs/shapes.md: 16% all-correct at the base size against 25%; kept so that figure can be reproduced).

What the full budget has shown (seed 0, 2-core CPU; reconstructions and samples of evaluation clips scored by eval).
With PyTorch's default conv init the VAE never left the image-independent "background only" solution; with
``init_vae`` and the object-weighted loss of the posterior mean, 360 steps of whole 128 px frames in 9-frame windows
(12.4 min) reconstructed every evaluation clip with the right colour and direction, and a transformer of 2000 steps
trained on its latents drew the captioned colour in 7 of 8 and the direction in 8 of 8 (Euler, 20 steps, guidance
4); but it was blurry everywhere (edge sharpness 0.10 against about 1 for a one-pixel edge; an added gradient loss
did not sharpen it, L1 fell back to the background) and late frames carried a dark trail. Overfitting four single
frames reaches fill 0.95 on squares and sharpness 0.37 in 200 steps: the capacity is there, the window steps were
too few and too dear. Now: 300 steps of 8 whole single frames (the spatial path; 1.2 s a step), then 500 steps of
two 17-frame windows cropped to 64 px (the temporal path; 1.5 s a step), 1077 s in all: one object in every frame,
colour and direction right in 8 of 8 reconstructions, PSNR 23-27 dB, discs right, but squares' corners still round
(fill 0.82-0.86 against the 0.89 threshold), so 4 of 8 all-correct. Square corners are what the VAE must buy next."""


@dataclass(frozen=True)
class WorldTrainConfig:
    """One `world train` run."""

    output: str
    """Folder of the model (diffusers layout) and its checkpoints."""
    seed: int = 0
    """Seed of every weight init and every draw (clips, crops, noise, timesteps)."""
    budget: str = "full"
    """'tiny', 'short', 'full' or 'wide' (see BUDGETS)."""
    resume: bool = False
    """Continue the run in a non-empty OUTPUT instead of refusing it."""

    def __post_init__(self) -> None:
        check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
            "seed",
            self.seed,
            "must be an integer >= 0",
        )
        check(self.budget in BUDGETS, "budget", self.budget, f"must be one of {'|'.join(BUDGETS)}")

    @property
    def plan(self) -> WorldBudget:
        return BUDGETS[self.budget]


# --- run folder -----------------------------------------------------------------------------------------------


def prepare_output(cfg: WorldTrainConfig) -> Path:
    """Create OUTPUT or, with resume, check it belongs to this run (same seed and budget); a non-empty folder without
    resume is refused (ConfigError, exit 2)."""
    out = Path(cfg.output)
    check(not out.exists() or out.is_dir(), "output", cfg.output, "must be a folder")
    run = {"seed": cfg.seed, "budget": cfg.budget}
    if out.exists() and any(out.iterdir()):
        if not cfg.resume:
            raise ConfigError(
                "output", cfg.output, "is not empty; pass --resume to continue the run in it, or choose a new folder"
            )
        saved = _read_run(out)
        if saved != run:
            raise ConfigError("resume", cfg.output, f"the folder holds a run with {saved}, not {run}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_JSON).write_text(json.dumps(run) + "\n")
    return out


def _read_run(out: Path) -> dict:
    path = out / RUN_JSON
    if not path.is_file():
        raise ConfigError("output", str(out), f"has no {RUN_JSON}: not a `world train` folder, nothing to resume")
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if k in ("seed", "budget")}
    except ValueError as e:
        raise ConfigError("output", str(out), f"{path.name} is not JSON ({e})") from None


# --- shared training loop -------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% (at most 50 steps), then cosine from peak to peak / 10."""
    warm = max(1, min(50, steps // 10))
    decay = 0.55 + 0.45 * math.cos(math.pi * step / max(steps, 1))
    return peak * min(1.0, (step + 1) / warm) * decay


@dataclass
class StageRun:
    """One optimisation stage: the module, its loss per step and how long to run."""

    name: str
    module: torch.nn.Module
    loss: Callable[[int], torch.Tensor]
    steps: int
    lr: float
    ema: torch.nn.Module | None = None
    """A copy of ``module`` that tracks an exponential moving average of its weights (what is exported)."""


def ema_decay(step: int, cap: float = 0.999) -> float:
    """EMA decay after ``step`` optimizer steps: (1 + step) / (10 + step), at most ``cap`` (short runs average
    less of their noisy start)."""
    return min(cap, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, module: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), module.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def stage_tensors(stage: "StageRun", opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    ema = {} if stage.ema is None else module_tensors(stage.ema, "ema")
    return {**module_tensors(stage.module, "model"), **ema, **optimizer_tensors(opt)}


def run_stage(out: Path, plan: WorldBudget, stage: StageRun, log: Callable[[str], None]) -> StageState:
    """Train ``stage`` from its last checkpoint (or from scratch) to ``stage.steps``; checkpoint every save_every
    and at the end. Returns the final state (done)."""
    folder = stage_dir(out, stage.name)
    opt = torch.optim.AdamW([p for p in stage.module.parameters() if p.requires_grad], lr=stage.lr, weight_decay=0.0)
    state, tensors = read_stage(folder)
    if tensors:
        restore(stage.module, opt, tensors, "model")
        if stage.ema is not None:
            restore(stage.ema, None, tensors, "ema")
        log(f"{stage.name}: resumed at step {state.step}")
    if state.done:
        return state
    stage.module.train()
    start = time.perf_counter()
    while state.step < stage.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(state.step, stage.steps, stage.lr)
        loss = stage.loss(state.step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if stage.ema is not None:
            ema_update(stage.ema, stage.module, ema_decay(state.step))
        state.step += 1
        if state.step % plan.log_every == 0 or state.step == stage.steps:
            state.losses.append([state.step, round(float(loss.detach()), 6)])
            log(
                f"{stage.name}: step {state.step}/{stage.steps} loss {state.losses[-1][1]:.5f} "
                f"({state.seconds + time.perf_counter() - start:.0f} s)"
            )
        last = state.step == stage.steps
        if last or (plan.save_every and state.step % plan.save_every == 0):
            state.seconds += time.perf_counter() - start
            start = time.perf_counter()
            state.done = last
            commit_stage(folder, state, stage_tensors(stage, opt))
    stage.module.eval()
    return state


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """numpy draws of one step (clip, window, crop)."""
    return np.random.default_rng([seed, sum(map(ord, stage)), step])


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """torch draws of one step (posterior sample, noise, timestep)."""
    return torch.Generator().manual_seed(int(step_rng(seed, stage, step).integers(2**62)))


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (3, N, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


# --- stage A: VAE ---------------------------------------------------------------------------------------------


def _random_clip(rng: np.random.Generator) -> WorldClip:
    """A training clip: any caption, a start seed outside the evaluation seeds."""
    return WorldClip(all_scenes()[int(rng.integers(len(all_scenes())))], POOL_SEED_BASE + int(rng.integers(10**6)))


def _crop_corner(centre: np.ndarray, offset, crop: int, width: int, height: int) -> tuple[int, int]:
    """(left, top) of a crop x crop box centred ``offset`` px from ``centre``, moved inside the frame."""
    left = int(np.clip(centre[0] - crop / 2 + offset[0], 0, width - crop))
    top = int(np.clip(centre[1] - crop / 2 + offset[1], 0, height - crop))
    return left, top


def vae_crop(plan: WorldBudget, rng: np.random.Generator) -> torch.Tensor:
    """(3, vae_frames, crop, crop) of a random clip: a window of a base-size clip (one random frame when vae_frames
    is 1), cropped near the object's first position (so in a 64 px crop of 17 frames it leaves the crop late in
    the window; centring on its mid-window position instead measured worse: 2 of 8 evaluation clips reconstructed
    all-correct against 4 of 8, PSNR 22-24 dB against 23-27)."""
    clip = _random_clip(rng)
    motion = clip.motion(plan.width, plan.height)
    first = int(rng.integers(plan.frames - plan.vae_frames + 1))
    frames = clip.render(plan.width, plan.height, plan.frames)[first : first + plan.vae_frames]
    centre = centres_px(clip.scene, motion, plan.width, plan.height, plan.frames)[first]
    c = plan.vae_crop
    jitter = rng.integers(-c // 4, c // 4 + 1, size=2)
    left, top = _crop_corner(centre, jitter, c, plan.width, plan.height)
    return to_pixels(frames[:, top : top + c, left : left + c])


DECODER_SCALES = (1, 2, 4)
"""Sizes (x the base size per side) and lengths (x the base length in frame steps) of the clips the decoder stage
crops from. A caption's object is a fixed fraction of the frame and crosses half of it in any clip, so at 4x the
size and length (generate's default output) the object is 4x wider in pixels and moves as many pixels per frame as
at the base size: large interiors that move slowly, which base-size crops never show."""


def decoder_crop(plan: WorldBudget, rng: np.random.Generator, scales: tuple[int, ...] = DECODER_SCALES) -> torch.Tensor:
    """(3, vae_frames, crop, crop): a window of a clip at s x the base size per side and (frames - 1) k + 1 frames
    (s, k drawn from ``scales``), cropped anywhere from outside the object's edge to its centre (a crop near the
    centre of a large object is all interior)."""
    s, k = (int(rng.choice(scales)) for _ in range(2))
    width, height, frames = s * plan.width, s * plan.height, (plan.frames - 1) * k + 1
    clip = _random_clip(rng)
    first = int(rng.integers(frames - plan.vae_frames + 1))
    centres = centres_px(clip.scene, clip.motion(width, height), width, height, frames)
    window = centres[first : first + plan.vae_frames]  # (vae_frames, 2)
    reach = radius_px(width, height) + plan.vae_crop / 4
    c = plan.vae_crop
    left, top = _crop_corner(window[0], rng.uniform(-reach, reach, size=2), c, width, height)
    crops = [render_frame(clip.scene, centre, width, height)[top : top + c, left : left + c] for centre in window]
    return to_pixels(np.stack(crops))  # (3, vae_frames, c, c)


def vae_batch(plan: WorldBudget, seed: int, step: int) -> torch.Tensor:
    """The VAE's input at ``step``: single frames, whole (square) for the first vae_image_steps steps, (image_batch,
    3, 1, side, side) with side = min(W, H); then (vae_batch, 3, vae_frames, crop, crop) windows."""
    rng = step_rng(seed, "vae", step)
    side = min(plan.width, plan.height)
    images = replace(plan, vae_frames=1, vae_batch=plan.vae_image_batch, vae_crop=side)
    now = images if step < plan.vae_image_steps else plan
    return torch.stack([vae_crop(now, rng) for _ in range(now.vae_batch)])  # (B, 3, F, H, W)


_BACKGROUND = torch.tensor(BACKGROUND).view(1, 3, 1, 1, 1) / 127.5 - 1.0
OBJECT_WEIGHT = 4.0
"""Extra weight of the VAE's squared error on pixels that differ from the background (the object is ~5% of a
frame, and its colour and corners are what the evaluation reads)."""


def _object_weighted_mse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = 1.0 + OBJECT_WEIGHT * ((x - _BACKGROUND).abs().amax(1, keepdim=True) > 0.05).float()
    return (weight * (recon - x) ** 2).mean()


def vae_loss(vae, plan: WorldBudget, seed: int, kl_weight: float = 1e-4) -> Callable[[int], torch.Tensor]:
    """Object-weighted MSE of the reconstruction from the posterior mean (what the latent pool and generation
    use; a sampled latent's unit noise drowns the early latent's small spread) plus a small KL."""

    def loss(step: int) -> torch.Tensor:
        x = vae_batch(plan, seed, step)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return _object_weighted_mse(recon, x) + kl_weight * kl

    return loss


def decoder_loss(
    vae, plan: WorldBudget, seed: int, stage: str = "vae_decoder", scales: tuple[int, ...] = DECODER_SCALES
) -> Callable[[int], torch.Tensor]:
    """Object-weighted MSE of the decoder's reconstruction of decoder_crop windows (at ``scales``) from the frozen
    encoder's posterior mean; ``stage`` names the draws."""

    def loss(step: int) -> torch.Tensor:
        rng = step_rng(seed, stage, step)
        x = torch.stack([decoder_crop(plan, rng, scales) for _ in range(plan.vae_batch)])  # (B, 3, F, c, c)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        return _object_weighted_mse(vae.decode(z).sample, x)

    return loss


DECODER_STAGES: dict[str, tuple[int, ...]] = {"vae_decoder": DECODER_SCALES, "vae_decoder_base": (1,)}
"""The decoder-only stages in the order they run: name -> the scales its windows are cropped at. A stage's step
count is the budget field ``{name}_steps``."""


def decoder_phases(plan: WorldBudget) -> list[tuple[str, int, tuple[int, ...]]]:
    """The decoder-only stages the budget asks for, in order: (name, steps, scales)."""
    phases = [(name, getattr(plan, f"{name}_steps"), scales) for name, scales in DECODER_STAGES.items()]
    return [phase for phase in phases if phase[1]]


def decoder_stage(out: Path, vae, plan: WorldBudget, seed: int, log: Callable[[str], None]) -> dict[str, float]:
    """Train the VAE's decoder (and post-quant conv) alone: vae_decoder_steps on windows at DECODER_SCALES, then
    vae_decoder_base_steps at the base size. Returns each stage's seconds (empty: no such steps). The VAE leaves
    frozen."""
    seconds = {}
    for name, steps, scales in decoder_phases(plan):
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
        loss = decoder_loss(vae, plan, seed, name, scales)
        seconds[name] = run_stage(out, plan, StageRun(name, vae, loss, steps, plan.vae_decoder_lr), log).seconds
    vae.requires_grad_(False)
    return seconds


# --- stage: latent pool ---------------------------------------------------------------------------------------


def pool_clips(plan: WorldBudget) -> list[WorldClip]:
    """The clips the transformer trains on: the first pool_scenes captions x pool_seeds start seeds."""
    scenes = all_scenes()[: plan.pool_scenes]
    seeds = [POOL_SEED_BASE + k for k in range(plan.pool_seeds)]
    return [WorldClip(s, k) for k in seeds for s in scenes]


POOL_ENCODE_BATCH = 8
"""Clips encoded per VAE call: CPU conv3d takes oneDNN only for a batch above one, the per-clip path is several
times slower per clip."""


@torch.no_grad()
def encode_pool(vae, plan: WorldBudget) -> dict[str, torch.Tensor]:
    """Raw VAE latents of the pool (posterior mean), their caption indices and the per-channel mean / std."""
    clips = pool_clips(plan)
    lat = torch.cat(
        [
            vae.encode(
                torch.stack([to_pixels(c.render(plan.width, plan.height, plan.frames)) for c in batch])
            ).latent_dist.mode()
            for batch in chunked(clips, POOL_ENCODE_BATCH)
        ]
    )  # (N, C, f, h, w)
    caption = torch.tensor([all_scenes().index(c.scene) for c in clips])
    mean = lat.mean(dim=(0, 2, 3, 4))
    std = lat.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    pool = {"latents": lat, "caption": caption, "mean": mean, "std": std}
    if plan.dit_frame_steps:
        pool["frame_latents"], pool["frame_caption"] = encode_frames(vae, clips, caption, plan)
    return pool


FRAME_STRIDE = 4
"""Single frames of the pool: every 4th frame of each clip (the VAE's temporal factor: one per latent frame)."""


@torch.no_grad()
def encode_frames(vae, clips: list[WorldClip], caption: torch.Tensor, plan: WorldBudget):
    """Raw latents (N, C, 1, h, w) of frames 0, 4, 8, ... of every clip, each encoded alone, and their captions."""
    lat, cap = [], []
    for batch, ids in zip(chunked(clips, POOL_ENCODE_BATCH), chunked(caption.tolist(), POOL_ENCODE_BATCH)):
        pixels = torch.stack([to_pixels(c.render(plan.width, plan.height, plan.frames)) for c in batch])
        for f in range(0, plan.frames, FRAME_STRIDE):
            lat.append(vae.encode(pixels[:, :, f : f + 1]).latent_dist.mode())  # (b, C, 1, h, w)
            cap += ids
    return torch.cat(lat), torch.tensor(cap)


def set_latent_stats(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """The VAE config's latents_mean / latents_std (what generate and `train` normalise with)."""
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])


# --- stage B: transformer -------------------------------------------------------------------------------------


def flow_loss(
    transformer, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """Wan's flow matching on the base model (full attention): v = noise - x0 predicted at timestep 1000 sigma."""
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1.0 - s) * x0 + s * noise
    pred = transformer(xt, sigma * 1000.0, text, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())


def dit_loss(
    transformer, pool: dict, texts: torch.Tensor, plan: WorldBudget, seed: int, frames: bool = False
) -> Callable[[int], torch.Tensor]:
    """Loss of one step: ``dit_batch`` pool clips (``frames``: ``dit_frame_batch`` single frames), each with its own
    sigma and noise; texts is (33, L, D), the 32 captions then the empty prompt."""
    from ..train.config import TrainConfig
    from ..train.train import sample_sigma

    sigma_cfg = TrainConfig(timestep_sampling="uniform", timestep_shift=FLOW_SHIFT)
    key, batch, stage = ("frame_", plan.dit_frame_batch, "dit_frames") if frames else ("", plan.dit_batch, "dit")
    latents = (pool[f"{key}latents"] - pool["mean"].view(1, -1, 1, 1, 1)) / pool["std"].view(1, -1, 1, 1, 1)

    def loss(step: int) -> torch.Tensor:
        gen = step_generator(seed, stage, step)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        cap = torch.where(drop, torch.full_like(idx, len(texts) - 1), pool[f"{key}caption"][idx])
        sigma = torch.cat([sample_sigma(sigma_cfg, gen) for _ in range(batch)])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        return flow_loss(transformer, x0, noise, sigma, texts[cap])

    return loss


@torch.no_grad()
def caption_embeddings(tokenizer, text_encoder) -> torch.Tensor:
    """(33, SHAPES_TEXT_LEN, dim): the 32 captions, then the empty prompt; padded as generate pads."""
    from ..pipeline.text import encode_text

    captions = [s.caption for s in all_scenes()] + [""]
    return encode_text(tokenizer, text_encoder, captions, SHAPES_TEXT_LEN, "cpu", torch.float32)


# --- the recipe -----------------------------------------------------------------------------------------------


def latent_stage(out: Path, vae, plan: WorldBudget, log) -> tuple[StageState, dict]:
    folder = stage_dir(out, "latents")
    state, pool = read_stage(folder)
    if not state.done:
        start = time.perf_counter()
        pool = encode_pool(vae, plan)
        state = StageState(step=1, done=True, seconds=time.perf_counter() - start)
        commit_stage(folder, state, pool)
        log(
            f"latents: {len(pool['latents'])} clips encoded to {tuple(pool['latents'].shape[1:])} "
            f"({state.seconds:.0f} s)"
        )
    return state, pool


GENERATE_GUIDANCE = 1.5
"""Classifier-free guidance the shapes model is run with (its atlasvid_model.json default). Measured on the shipped
model at its base size (32 captions x seeds 0, 1, 2; 2026-12-05): all-correct 75 / 62 / 62% at 1.5 against
56 / 47 / 47% at 4 (2: 72 / 59%, 1: 69 / 53%; Wan's own default is 5): stronger guidance rounds the squares'
corners (fill of the bounding box 0.85-0.90 at 4, 0.78-0.87 at 8) and splits objects. Chosen on seeds 0 and 1,
seed 2 held out."""
GENERATE_STEPS = 20
"""Denoising steps per stage the shapes model is run with."""


def model_defaults(cfg: WorldTrainConfig, times: dict, sizes: dict) -> dict:
    """What atlasvid_model.json records: the base size the transformer was trained at and its window (what
    ``--window auto`` and the automatic spatial scale aim at), the options generate runs it with unless told
    otherwise (4x the base size per side, 4x the frames: the README's main command), and how it was made."""
    p = cfg.plan
    frames = adapter_frames(p.frames)
    return {
        "name": "shapes",
        "base_width": p.width,
        "base_height": p.height,
        "base_frames": p.frames,
        "window": [(p.frames - 1) // 4 + 1, p.height // 16, p.width // 16],
        "generate": {
            "res": f"{4 * p.width}x{4 * p.height}",
            "frames": frames,
            "fps": int(p.fps),
            "temporal_scale": TEMPORAL_SCALE,
            "spatial_scale": 0,
            "flow_shift": FLOW_SHIFT,
            "proxy_flow_shift": FLOW_SHIFT,
            "negative_prompt": "",
            "text_len": SHAPES_TEXT_LEN,
            "guidance": GENERATE_GUIDANCE,
            "steps": GENERATE_STEPS,
            "proxy_steps": GENERATE_STEPS,
        },
        "seed": cfg.seed,
        "budget": cfg.budget,
        "seconds": times,
        "params": sizes,
        "trained_on": asdict(p),
    }


def export(out: Path, parts: dict, defaults: dict) -> None:
    """The diffusers-format folder (model_index.json + the five parts, safetensors) and the defaults JSON."""
    from diffusers import WanPipeline

    from ..models.tiny import _apply_umask_tree

    WanPipeline(**parts).save_pretrained(out, safe_serialization=True)
    write_defaults(out, defaults)
    _apply_umask_tree(out)


def train_world_model(cfg: WorldTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole recipe into cfg.output; returns the defaults written (times and sizes included)."""
    out = prepare_output(cfg)
    plan = cfg.plan
    tokenizer = build_world_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), cfg.seed + 2)
    vae = build_vae(cfg.seed)
    vae_state = run_stage(
        out,
        plan,
        StageRun("vae", vae, vae_loss(vae, plan, cfg.seed), plan.vae_image_steps + plan.vae_steps, plan.vae_lr),
        log,
    )
    decoder_seconds = decoder_stage(out, vae, plan, cfg.seed, log)
    vae.requires_grad_(False)
    pool_state, pool = latent_stage(out, vae, plan, log)
    set_latent_stats(vae, pool["mean"], pool["std"])
    trained = build_transformer(cfg.seed + 1, plan.dit_heads, plan.dit_ffn)
    transformer = copy.deepcopy(trained).requires_grad_(False)  # the EMA of `trained`: what is exported
    texts = caption_embeddings(tokenizer, text_encoder)
    times = {"vae": round(vae_state.seconds, 1), "latents": round(pool_state.seconds, 1)}
    times.update({name: round(seconds, 1) for name, seconds in decoder_seconds.items()})
    if plan.dit_frame_steps:  # single frames first, the same module and EMA then go on with clips
        frame_loss = dit_loss(trained, pool, texts, plan, cfg.seed, frames=True)
        stage = StageRun("dit_frames", trained, frame_loss, plan.dit_frame_steps, plan.dit_lr, transformer)
        times["dit_frames"] = round(run_stage(out, plan, stage, log).seconds, 1)
    dit_state = run_stage(
        out,
        plan,
        StageRun(
            "dit", trained, dit_loss(trained, pool, texts, plan, cfg.seed), plan.dit_steps, plan.dit_lr, transformer
        ),
        log,
    )
    start = time.perf_counter()
    times["dit"] = round(dit_state.seconds, 1)
    sizes = {k: param_count(m) for k, m in (("vae", vae), ("transformer", transformer), ("text_encoder", text_encoder))}
    defaults = model_defaults(cfg, times, sizes)
    export(
        out,
        dict(
            transformer=transformer.eval(),
            vae=vae.eval(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=build_scheduler(),
        ),
        defaults,
    )
    times["export"] = round(time.perf_counter() - start, 1)
    write_defaults(out, {**defaults, "seconds": times})
    if plan.lora_steps:
        for stage in (1, 2):
            times[f"lora{stage}"] = round(train_adapter(out, plan, stage, cfg.seed, defaults["window"], log), 1)
        defaults["generate"].update(adapter_defaults())
        write_defaults(out, {**defaults, "seconds": times})
    log(f"model: {out} (seconds per stage: {times})")
    return {**defaults, "seconds": times}


__all__ = ["BUDGETS", "CHECKPOINTS", "WorldBudget", "WorldTrainConfig", "train_world_model"]
