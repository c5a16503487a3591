"""LoRA training of AtlasVid's two stages under DeepSpeed ZeRO (script and importable module).

    deepspeed atlasvid_dist/train/train.py --deepspeed --deepspeed_config zero2 --config configs/train/stage1.yaml
    torchrun --nproc_per_node 2 atlasvid_dist/train/train.py ...   (gloo on CPU, NCCL on GPUs)

Objective (flow matching as Wan trains it): x_t = (1 - s) x0 + s eps, target v = eps - x0, timestep s * 1000,
loss = mean squared error of the predicted v. Stage 1 predicts the proxy with ``proxy_forward`` (full attention,
temporally scaled RoPE); stage 2 predicts the detail with ``forward(..., proxy=clean proxy latent)`` (windows
reading the clean proxy), so the loss covers detail tokens only; stage 2 with ``mode: ultragen`` runs
``forward`` without a proxy (windows + compressed global branch). Only the LoRA weights train (peft, added with
``transformer.add_adapter``); the optimizer is a plain torch AdamW handed to DeepSpeed (no cpu_adam build).

Exact resume: clip choice, timestep and noise of a step depend only on (seed, step, rank), and train/state.py
restores LoRA weights, Adam moments and step, lr schedule and RNG from safetensors + JSON (never DeepSpeed's pickled
.pt files), so the step after a resume computes the same loss as without the stop.

Timesteps: s drawn uniform or logit-normal in (0, 1) by diffusers' ``compute_density_for_timestep_sampling`` from
the step's generator, then Wan's shift (``timestep_sampling``, ``timestep_shift``).

Compromises: on raw videos the VAE and text encoder run every step (cheap at the tiny size); ``prepare-data``
encodes a dataset once into shards (train/shards.py) that training then reads instead.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from atlasvid_dist.config.files import from_mapping, read_mapping
from atlasvid_dist.configs import DEEPSPEED_PRESETS, DEFAULT_DEEPSPEED, read_deepspeed_config
from atlasvid_dist.errors import ConfigError
from atlasvid_dist.train.config import TINY_DEFAULTS, TrainConfig
from atlasvid_dist.train.data import LatentEncoder, sample_clip, scan_dataset, step_generator
from atlasvid_dist.train.launch import die_with_parent
from atlasvid_dist.train.shards import PreparedData, is_prepared
from atlasvid_dist.train.state import CHECKPOINTS, commit_state, gather_state, load_state, restore_state, resumable

ADAPTER_FILE = "adapter.safetensors"


class FlowMatchingLoss(nn.Module):
    """The module DeepSpeed wraps: AtlasTransformer + the flow-matching loss of one stage.

    Stage 2 reads the clean proxy as generation does: its keys/values are built without gradients by
    ``proxy_cache_for`` (the function generate uses) with the frozen ``proxy_adapter`` active (None: base weights),
    then ``adapter`` (the one being trained) is made active for the detail tokens, the only ones in the loss.
    ``atlases`` maps each spatial scale trained to an AtlasTransformer over the same transformer."""

    def __init__(
        self,
        atlas: nn.Module,
        stage: int,
        adapter: str | None = None,
        proxy_adapter: str | None = None,
        atlases: dict | None = None,
    ):
        super().__init__()
        self.atlas, self.stage = atlas, stage
        if adapter is None:  # the adapter active now is the one trained
            from atlasvid_dist.models.lora import active_adapter

            adapter = active_adapter(atlas.transformer)
        self.adapter, self.proxy_adapter = adapter, proxy_adapter
        self._atlases = dict(
            atlases or {atlas.atlas_config.spatial_scale: atlas}
        )  # plain dict: weights registered once

    def forward(self, x0, noise, sigma, text, proxy=None, spatial_scale=None):
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise  # (B, C, f, h, w)
        t = sigma * 1000.0
        if self.stage == 1:
            pred = self.atlas.proxy_forward(xt, t, text)
        else:
            atlas = self.atlas_for(spatial_scale)
            cache = None if proxy is None else self.proxy_cache(atlas, proxy, text)  # ultragen reads no proxy
            pred = atlas(xt, t, text, proxy_cache=cache)
        return F.mse_loss(pred.float(), (noise - x0).float())

    def atlas_for(self, spatial_scale: int | None) -> nn.Module:
        """The AtlasTransformer of a spatial scale (the default one for None)."""
        return self.atlas if spatial_scale is None else self._atlases[int(spatial_scale)]

    def proxy_cache(self, atlas: nn.Module, proxy: torch.Tensor, text: torch.Tensor):
        """The clean proxy's keys/values as generate builds them (frozen stage-1 adapter, no gradients); afterwards
        the trained adapter is the active one and the frozen adapter's weights stay out of the graph."""
        from atlasvid_dist.pipeline.proxy_cache import proxy_cache_for

        cache = proxy_cache_for(atlas, proxy, text, self.proxy_adapter)
        activate_trainable(atlas.transformer, self.adapter, self.proxy_adapter)
        return cache


def activate_trainable(transformer: nn.Module, adapter: str | None, frozen: str | None) -> None:
    """Make ``adapter`` the only active LoRA and keep ``frozen``'s weights without gradients (peft's set_adapter
    turns requires_grad on for whichever adapter it activates)."""
    from atlasvid_dist.models.lora import set_active_adapter

    if adapter is not None:
        set_active_adapter(transformer, adapter)
    if frozen is not None:
        for name, p in transformer.named_parameters():
            if f".{frozen}." in name:
                p.requires_grad_(False)


def tensorboard_writer(cfg: TrainConfig, out: Path):
    """A SummaryWriter under OUTPUT/tensorboard when cfg.tensorboard, else None (ConfigError without the package)."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("tensorboard", True, f"needs the tensorboard package (pip install tensorboard): {e}") from e
    return SummaryWriter(str(out / "tensorboard"))


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's shifted noise level: sigma = shift * s / (1 + (shift - 1) * s) (identity for shift = 1)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sample_sigma(cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The flow-matching noise level of one example, (1,), in [1e-3, 1 - 1e-3]: s ~ uniform or logit-normal
    (sigmoid of N(0, 1)) drawn by diffusers' ``compute_density_for_timestep_sampling`` from ``gen`` (the step's
    seeded generator, so resume stays exact), then Wan's shift."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    s = compute_density_for_timestep_sampling(
        cfg.timestep_sampling, batch_size=1, logit_mean=0.0, logit_std=1.0, generator=gen
    )
    return shift_sigma(s, cfg.timestep_shift).clamp(1e-3, 1 - 1e-3)


DIFFUSERS_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}
"""lr_schedule -> diffusers.optimization.get_scheduler name (linear warm-up, then constant or cosine to 0)."""


def lr_scheduler_factory(cfg: TrainConfig):
    """The callable DeepSpeed calls with its optimizer to build our schedule (used when the DeepSpeed JSON has no
    "scheduler" block): diffusers' get_scheduler, a LambdaLR whose state_dict is plain JSON."""
    from diffusers.optimization import get_scheduler

    return lambda optimizer: get_scheduler(
        DIFFUSERS_SCHEDULES[cfg.lr_schedule],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )


def add_lora(transformer: nn.Module, cfg: TrainConfig, name: str) -> None:
    """peft LoRA ``name`` on the attention projections (same init on every rank: seeded)."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        transformer.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                target_modules=list(cfg.lora_targets),
                init_lora_weights=True,
            ),
            adapter_name=name,
        )
    if not any(p.requires_grad for n, p in transformer.named_parameters() if f".{name}." in n):
        raise ConfigError("lora_targets", cfg.lora_targets, "matched no module of the transformer")


NO_ADAPTER = "none"
"""``lora_stage1: none``: stage 2 trains without a stage-1 adapter (the proxy from the base weights)."""
PROXY_ADAPTER = "stage1"
"""Name of the frozen stage-1 adapter inside a stage-2 run (generate loads --lora-stage1 under the same name)."""


def trained_adapter_name(cfg: TrainConfig) -> str:
    """The trainable adapter's name: 'stage1' or 'stage2', as generate names the adapters it loads."""
    return f"stage{cfg.stage}"


def require_stage1_adapter(cfg: TrainConfig) -> None:
    """Stage 2 needs the frozen stage-1 adapter (lora_stage1 FILE) or an explicit 'none' (ConfigError otherwise)."""
    if cfg.stage == 2 and cfg.mode == "atlas" and not cfg.lora_stage1:
        raise ConfigError(
            "lora_stage1",
            "",
            "stage 2 reads the proxy keys/values of the stage-1 model, as generate "
            "does: pass --lora-stage1 FILE (the stage-1 adapter), or --no-stage1-adapter "
            "(lora_stage1: none) to train against the base weights",
        )


def no_adapter_warning(cfg: TrainConfig) -> str | None:
    """The loud line a stage-2 run without a stage-1 adapter prints (None otherwise)."""
    if cfg.stage != 2 or cfg.mode != "atlas" or cfg.lora_stage1 != NO_ADAPTER:
        return None
    return (
        "WARNING: stage 2 trains WITHOUT a stage-1 adapter (lora_stage1: none): the proxy keys/values come from "
        "the base weights, so generate must run stage 1 without --lora-stage1 for the adapter to see the same"
    )


def build_adapters(transformer: nn.Module, cfg: TrainConfig) -> tuple[str, str | None]:
    """Stage 2: the frozen stage-1 adapter (unless 'none') and the trainable stage-2 adapter in the one peft model;
    stage 1: the trainable adapter only. Returns (trainable name, frozen name or None); the trainable one is active.
    """
    from atlasvid_dist.models.lora import load_lora

    require_stage1_adapter(cfg)
    frozen = None
    if cfg.stage == 2 and cfg.mode == "atlas" and cfg.lora_stage1 not in (NO_ADAPTER, ""):  # ultragen: no proxy
        load_lora(transformer, cfg.lora_stage1, PROXY_ADAPTER)
        frozen = PROXY_ADAPTER
    name = trained_adapter_name(cfg)
    add_lora(transformer, cfg, name)
    activate_trainable(transformer, name, frozen)
    return name, frozen


SHARED_KEYS = {
    ("train_micro_batch_size_per_gpu",): "batch",
    ("gradient_accumulation_steps",): "grad_accum",
    ("gradient_clipping",): "grad_clip",
    ("optimizer", "params", "lr"): "lr",
    ("optimizer", "params", "weight_decay"): "weight_decay",
}
"""DeepSpeed JSON key path -> the TrainConfig field that sets the same thing."""
SCHEDULE_FIELDS = ("warmup_steps", "lr_schedule")
"""TrainConfig fields of our lr schedule (a JSON "scheduler" block replaces them)."""


def explicit_fields(cfg: TrainConfig) -> set[str]:
    """Fields of a config built in code that differ from the defaults (what its author chose)."""
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}


def merge_deepspeed(ds: dict, cfg: TrainConfig, explicit: set[str], world: int) -> tuple[dict, TrainConfig]:
    """The user's DeepSpeed keys win over TrainConfig defaults, explicit TrainConfig values fill what the JSON
    lacks, and a key set differently in both is refused (ConfigError naming the JSON key and the field).

    Returns the completed DeepSpeed dict and the config holding the values the run really uses."""
    ds = copy.deepcopy(ds)
    updates = {}
    for path, field in SHARED_KEYS.items():
        parent = _json_parent(ds, path)
        if parent is None:  # e.g. optimizer.params without an optimizer block: our AdamW uses cfg.lr
            continue
        ours = getattr(cfg, field)
        if path[-1] not in parent:
            parent[path[-1]] = ours
        elif field in explicit and parent[path[-1]] != ours:
            raise ConfigError(
                f"deepspeed_config {'.'.join(path)}",
                parent[path[-1]],
                f"conflicts with the training config's {field}={ours!r}; set it in one place",
            )
        else:
            updates[field] = parent[path[-1]]
    _check_scheduler(ds, cfg, explicit)
    cfg = _replace(cfg, updates)
    total = cfg.batch * cfg.grad_accum * world
    if ds.setdefault("train_batch_size", total) != total:
        raise ConfigError(
            "deepspeed_config train_batch_size",
            ds["train_batch_size"],
            f"must be train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks = "
            f"{cfg.batch} x {cfg.grad_accum} x {world} = {total}",
        )
    ds.setdefault("steps_per_print", 10**9)
    ds["zero_allow_untested_optimizer"] = True
    return ds, cfg


def _json_parent(ds: dict, path: tuple) -> dict | None:
    """The dict holding ``path``'s last key: ds itself, or the params of an existing block ("optimizer"), else
    None."""
    if len(path) == 1:
        return ds
    block = ds.get(path[0])
    return block.setdefault(path[1], {}) if isinstance(block, dict) else None


def _check_scheduler(ds: dict, cfg: TrainConfig, explicit: set[str]) -> None:
    """A JSON "scheduler" block and an explicit warmup_steps / lr_schedule exclude each other; DeepSpeed's
    decaying schedules get total_num_steps = max_steps unless the JSON sets it."""
    sched = ds.get("scheduler")
    if sched is None:
        return
    both = sorted(set(SCHEDULE_FIELDS) & explicit)
    if both:
        raise ConfigError(
            "deepspeed_config scheduler",
            sched.get("type"),
            f"conflicts with the training config's {', '.join(f'{f}={getattr(cfg, f)!r}' for f in both)}"
            "; use one lr schedule (remove one of them)",
        )
    if sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        sched.setdefault("params", {}).setdefault("total_num_steps", cfg.max_steps)


def _replace(cfg: TrainConfig, updates: dict) -> TrainConfig:
    """cfg with the DeepSpeed JSON's values (ConfigError naming the field when one breaks its rule)."""
    return dataclasses.replace(cfg, **updates) if updates else cfg


def deepspeed_config(
    spec: str, cfg: TrainConfig, world: int, device: torch.device, explicit: set[str] | None = None
) -> tuple[dict, TrainConfig]:
    """The DeepSpeed dict of a run (a packaged name or a JSON file, merged with the config by merge_deepspeed;
    bf16 on bf16-capable CUDA unless set; torch's AdamW for an Adam block on a machine without CUDA, where
    DeepSpeed's fused Adam would need a compiled op) and the config the run uses."""
    explicit = explicit_fields(cfg) if explicit is None else explicit
    ds, cfg = merge_deepspeed(read_deepspeed_config(str(spec)), cfg, explicit, world)
    if "bf16" not in ds:
        ds["bf16"] = {"enabled": device.type == "cuda" and torch.cuda.is_bf16_supported()}
    opt = ds.get("optimizer")
    if opt and str(opt.get("type", "")).lower() in ("adam", "adamw") and device.type != "cuda":
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    return ds, cfg


class Trainer:
    """Builds the model, data and DeepSpeed engine of one rank; ``run()`` trains and returns the losses logged."""

    def __init__(self, cfg: TrainConfig, ds_config_path: str, *, log=print, explicit: set[str] | None = None):
        import deepspeed
        import torch.distributed as dist

        from atlasvid_dist.models.atlas_transformer import AtlasTransformer
        from atlasvid_dist.models.loading import load_components

        self.log = log
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        ds, cfg = deepspeed_config(ds_config_path, cfg, self.world, self.device, explicit)
        self.cfg = cfg
        require_stage1_adapter(cfg)
        if no_adapter_warning(cfg) and self.rank == 0:
            log(no_adapter_warning(cfg))
            print(no_adapter_warning(cfg), file=sys.stderr, flush=True)
        self.prepared = PreparedData(cfg.data, cfg) if is_prepared(cfg.data) else None
        if self.prepared is not None and len(cfg.scales) > 1:
            raise ConfigError(
                "spatial_scales",
                list(cfg.scales),
                "prepared data holds one proxy size; train from the videos to draw the spatial scale per step",
            )
        self.data = scan_dataset(cfg.data, cfg) if self.prepared is None else None
        comp = load_components(cfg.model, device=str(self.device))
        self.transformer = comp.transformer
        self.adapter, frozen = build_adapters(self.transformer, cfg)
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        atlases = {s: AtlasTransformer(self.transformer, cfg.method_config(s)) for s in cfg.scales}
        self.dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
        self.encoder = LatentEncoder(comp.vae, comp.tokenizer, comp.text_encoder, cfg.text_len, self.device, self.dtype)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        # The JSON's "optimizer" / "scheduler" blocks are built by DeepSpeed; without them, ours.
        opt = None if "optimizer" in ds else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = None if "scheduler" in ds else lr_scheduler_factory(cfg)
        loss = FlowMatchingLoss(atlases[cfg.scales[0]], cfg.stage, self.adapter, frozen, atlases)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=loss, model_parameters=params, optimizer=opt, lr_scheduler=sched, config=ds
        )
        self.optimizer = self.engine.optimizer.optimizer  # the torch optimizer inside ZeRO (its state: Adam's)
        self.step, self._committed = 0, None
        self.out = Path(cfg.output)
        self.tb = tensorboard_writer(cfg, self.out) if self.rank == 0 else None
        if self.data is not None and self.data.skipped and self.rank == 0:
            log(
                f"skipped {len(self.data.skipped)} bad entries: " + "; ".join(f"{f}: {r}" for f, r in self.data.skipped)
            )

    # ---------------------------------------------------------------------------------------------- batches
    def batch(self, step: int) -> tuple[dict, int]:
        """The inputs of this rank's ``cfg.batch`` clips at micro step ``step`` and their token count."""
        gen = step_generator(self.cfg.seed, step, self.rank)
        scale = self._spatial_scale(gen)
        examples = [self._example(gen, scale) for _ in range(self.cfg.batch)]
        inputs = {k: torch.cat([e[0][k] for e in examples]) for k in examples[0][0]}
        if self.cfg.stage == 2:
            inputs["spatial_scale"] = scale
        return inputs, sum(e[1] for e in examples)

    def _spatial_scale(self, gen: torch.Generator) -> int:
        """This step's spatial scale: drawn from spatial_scales with ``gen`` (nothing drawn without a list, so
        single-scale runs see the same random stream as before)."""
        if not self.cfg.spatial_scales:
            return self.cfg.spatial_scale
        return self.cfg.scales[int(torch.randint(len(self.cfg.scales), (1,), generator=gen))]

    def _example(self, gen: torch.Generator, scale: int) -> tuple[dict, int]:
        """One clip's inputs (batch dimension 1) at spatial scale ``scale``, drawn with ``gen``, and its token count."""
        if self.prepared is not None:  # encoded once by prepare-data
            rec = self.prepared.get(int(torch.randint(len(self.prepared), (1,), generator=gen)))
            rec = {k: v.to(self.device, self.dtype) for k, v in rec.items()}
            text, proxy = rec["text"], rec["proxy"]
            x0 = proxy if self.cfg.stage == 1 else rec["detail"]
        else:
            cfg = self.cfg if scale == self.cfg.spatial_scale else dataclasses.replace(self.cfg, spatial_scale=scale)
            clip = sample_clip(self.data, cfg, gen)
            text = self.encoder.text(clip.caption)
            proxy = self.encoder.video(clip.proxy)
            x0 = proxy if self.cfg.stage == 1 else self.encoder.video(clip.detail)
        sigma = sample_sigma(self.cfg, gen)
        noise = torch.randn(x0.shape, generator=gen).to(x0.dtype)
        inputs = dict(x0=x0, noise=noise.to(self.device), sigma=sigma.to(self.device, self.dtype), text=text)
        if self.cfg.stage == 2 and self.cfg.mode == "atlas":  # ultragen reads no proxy
            inputs["proxy"] = proxy
        tokens = x0[0, 0].numel() // 4  # latent cells / (1 x 2 x 2) patch
        return inputs, tokens

    # ---------------------------------------------------------------------------------------------- loop
    def train_step(self) -> tuple[float, int]:
        """One optimizer step (cfg.grad_accum micro steps; DeepSpeed steps the optimizer at the last); returns the
        loss averaged over micro steps and ranks, and this rank's token count."""
        import torch.distributed as dist

        total, tokens = torch.zeros(()), 0
        for micro in range(self.cfg.grad_accum):
            inputs, n = self.batch(self.step * self.cfg.grad_accum + micro)
            loss = self.engine(**inputs)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float().cpu()
            tokens += n
        self.step += 1
        dist.all_reduce(total)
        return float(total) / (self.world * self.cfg.grad_accum), tokens

    @torch.no_grad()
    def eval_loss(self, steps) -> float:
        """Mean loss (over ranks and the given steps' batches) without training: a fixed yardstick for tests."""
        import torch.distributed as dist

        self.engine.eval()
        total = torch.zeros(())
        for s in steps:
            total += self.engine(**self.batch(s)[0]).float().cpu()
        self.engine.train()
        dist.all_reduce(total)
        return float(total) / (self.world * len(steps))

    def run(self, max_steps: int | None = None) -> list[float]:
        """Train to ``max_steps`` (default cfg.max_steps); checkpoint every save_every and at the end."""
        cfg = self.cfg
        stop = cfg.max_steps if max_steps is None else max_steps
        losses, start = [], time.perf_counter()
        while self.step < stop:
            t0 = time.perf_counter()
            loss, tokens = self.train_step()
            losses.append(loss)
            if (self.step - 1) % cfg.log_every == 0 and self.rank == 0:
                now = time.perf_counter()
                eta = (stop - self.step) * (now - start) / len(losses)  # remaining steps x mean step time
                self._log(
                    dict(
                        step=self.step,
                        loss=loss,
                        lr=self.optimizer.param_groups[0]["lr"],
                        tokens_per_s=tokens * self.world / (now - t0),
                        step_s=now - t0,
                        peak_mem_gb=_peak_memory_gb(),
                        eta_s=round(eta, 1),
                        eta=_hms(eta),
                    )
                )
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
        self.save()
        return losses

    def _log(self, record: dict) -> None:
        line = json.dumps(record)
        self.log(line)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(line + "\n")
        if self.tb is not None:
            for key in ("loss", "lr", "tokens_per_s", "step_s"):
                self.tb.add_scalar(f"train/{key}", record[key], record["step"])
            self.tb.flush()

    # ---------------------------------------------------------------------------------------------- state
    def save(self) -> None:
        """Commit this step's training state (train/state.py: safetensors + JSON, no pickle) from rank 0.

        Every rank must call it (the full parameters and Adam moments are gathered from the ZeRO partitions)."""
        import torch.distributed as dist

        if self._committed == self.step:  # nothing changed since this step was loaded or saved
            return
        tensors, meta = gather_state(self)
        if self.rank == 0:
            commit_state(self.out / CHECKPOINTS, self.step, tensors, meta)
        dist.barrier()
        self._committed = self.step

    def resume(self) -> bool:
        """Load the newest committed step of OUTPUT/checkpoints (safetensors only); False when there is none.

        DeepSpeed .pt checkpoints are never loaded (torch.load can run code planted in them): a folder with only
        those is refused (ConfigError)."""
        step = resumable(self.out)
        if step is None:
            return False
        restore_state(self, *load_state(self.out / CHECKPOINTS, step))
        self.step = self._committed = step
        return True

    def export(self) -> Path | None:
        """Rank 0 writes OUTPUT/adapter.safetensors (diffusers LoRA format; ZeRO-3 shards gathered first).

        Every rank must call it. Returns the path on rank 0, None elsewhere."""
        import deepspeed
        import torch.distributed as dist

        from atlasvid_dist.models.lora import save_lora
        from atlasvid_dist.pipeline.adapter_geometry import geometry_metadata, training_geometry

        path = None
        lora_params = [p for n, p in self.transformer.named_parameters() if ".lora_" in n]
        with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):  # ZeRO-3 shards; else a no-op
            if self.rank == 0:
                path = save_lora(
                    self.transformer,
                    self.adapter,
                    self.out / ADAPTER_FILE,
                    extra_metadata=geometry_metadata(training_geometry(self.cfg)),
                )
        dist.barrier()
        return path


def _hms(seconds: float) -> str:
    """'H:MM:SS' of a duration."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _peak_memory_gb() -> float:
    """Peak memory of this rank: CUDA allocator peak on a GPU, else the process's peak resident set (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="AtlasVid LoRA training under DeepSpeed ZeRO")
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=DEFAULT_DEEPSPEED,
        help=f"DeepSpeed JSON file, or a packaged one: {'|'.join(DEEPSPEED_PRESETS)} (default: %(default)s)",
    )
    p.add_argument(
        "--deepspeed",
        action="store_true",
        help="accepted as DeepSpeed's scripts pass it; DeepSpeed is always enabled here",
    )
    p.add_argument("--config", default=None, help="training YAML (TrainConfig fields)")
    p.add_argument("--stage", type=int, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--output", default=None)
    p.add_argument(
        "--steps",
        "--max-steps",
        "--max_steps",
        type=int,
        default=None,
        dest="max_steps",
        help="optimizer steps in total",
    )
    for flag, typ, helptext in OVERRIDE_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=helptext)
    p.add_argument("--res", default=None, help="detail training size WIDTHxHEIGHT, e.g. 128x128")
    p.add_argument(
        "--lora-stage1",
        "--lora_stage1",
        default=None,
        dest="lora_stage1",
        help="stage 2: the frozen stage-1 adapter whose proxy keys/values the detail reads",
    )
    p.add_argument(
        "--no-stage1-adapter",
        action="store_true",
        help="stage 2 without a stage-1 adapter (lora_stage1: none; the proxy from the base weights)",
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)  # passed by the deepspeed launcher
    return p.parse_args(argv)


OVERRIDE_FLAGS = (
    ("--mode", str, "stage-2 attention: atlas | ultragen"),
    ("--frames", int, "detail clip length in frames (4k+1)"),
    ("--fps", float, "detail frame rate"),
    ("--lr", float, "peak learning rate"),
    ("--batch", int, "clips per rank per micro step"),
    ("--grad-accum", int, "micro steps per optimizer step"),
    ("--seed", int, "random seed"),
    ("--warmup-steps", int, "linear lr warm-up steps"),
    ("--save-every", int, "checkpoint every N steps"),
)
"""Command-line flags that set the TrainConfig field of the same name (dashes for underscores)."""


def cli_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the command line sets (``--res WxH`` gives width and height)."""
    names = ["stage", "data", "model", "output", "max_steps"] + [f[2:].replace("-", "_") for f, _, _ in OVERRIDE_FLAGS]
    out = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "no_stage1_adapter", False):
        if getattr(args, "lora_stage1", None):
            raise ConfigError("lora_stage1", args.lora_stage1, "conflicts with --no-stage1-adapter; give one")
        out["lora_stage1"] = NO_ADAPTER
    elif getattr(args, "lora_stage1", None):
        out["lora_stage1"] = args.lora_stage1
    if args.res is not None:
        out["width"], out["height"] = parse_res(args.res)
    return out


def parse_res(res: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height) (ConfigError naming --res otherwise)."""
    parts = str(res).lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError("res", res, "must be WIDTHxHEIGHT in pixels, e.g. 128x128")
    return int(parts[0]), int(parts[1])


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    """The YAML (if any) with the command line over it; with model 'tiny', TINY_DEFAULTS for what neither sets."""
    data = read_mapping(args.config) if args.config else {}
    overrides = cli_overrides(args)
    if overrides.get("model", data.get("model", TrainConfig.model)) == "tiny":
        data = {**{k: v for k, v in TINY_DEFAULTS.items() if k not in overrides}, **data}
    return from_mapping(TrainConfig, data, str(args.config or "arguments"), overrides)


def given_fields(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields the YAML or the command line set explicitly (defaults excluded)."""
    return set(read_mapping(args.config) if args.config else {}) | set(cli_overrides(args))


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from atlasvid_dist.errors import AtlasError

    args = parse_args(argv)
    die_with_parent()  # a rank never outlives its launcher (torchrun), even a SIGKILLed one
    try:
        cfg = load_train_config(args)
        trainer = Trainer(cfg, args.deepspeed_config, explicit=given_fields(args))
        if args.resume and trainer.resume() and trainer.rank == 0:
            print(f"resumed at step {trainer.step}", flush=True)
        trainer.run()
        trainer.export()
    except AtlasError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
