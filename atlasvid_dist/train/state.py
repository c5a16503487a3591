"""Training checkpoints that cannot run code: safetensors + JSON, written and read without pickle.

DeepSpeed's own checkpoints are pickles read with ``torch.load(weights_only=False)``: a crafted
``mp_rank_00_model_states.pt`` runs code on ``--resume``. Here a step is committed by
:class:`~atlasvid_dist.pipeline.checkpoint.StepCheckpointer` (files written and fsynced, then a marker renamed
into place; checksums verified on load) under OUTPUT/checkpoints/step-NNNNNN and holds:

    tensors  param/NAME, exp_avg/NAME, exp_avg_sq/NAME   full (gathered) fp32 LoRA weights and Adam moments
             adam_step                                   Adam's step count (the same for every parameter)
             rng/cpu                                     (world, n) uint8: every rank's torch CPU RNG state
    meta     {"step", "world", "scheduler": LR scheduler state_dict (diffusers' LambdaLR or DeepSpeed's WarmupLR...),
              "lr": every param group's current lr, "engine": DeepSpeed step counters}

Saving gathers with deepspeed.utils.safe_get_full_fp32_param / safe_get_full_optimizer_state (collective: every
rank calls) and rank 0 writes. Loading reads on every rank; each rank writes its ZeRO-2/3 partitions through
safe_set_full_fp32_param and sets the model's own (low-precision) copy through GatheredParameters. DeepSpeed has
no public call that creates Adam's state before the first step, so the moments are placed into the optimizer's
flat fp32 partitions (named by ``_flat_partitions``) with safe_set_full_fp32_param, one moment at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..pipeline.checkpoint import StepCheckpointer

CHECKPOINTS = "checkpoints"
"""Subfolder of the output folder that holds the committed steps."""
KEEP = 2
"""Committed steps kept (older ones are removed after a new commit)."""
MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-element state."""


# -- finding and reading ----------------------------------------------------------------------------------------
def resumable(output: str | Path) -> int | None:
    """The newest committed step under OUTPUT/checkpoints, or None when there is none.

    A folder holding DeepSpeed .pt checkpoints but no committed step is refused (ConfigError naming it): those
    files are pickles, never loaded."""
    folder = Path(output) / CHECKPOINTS
    if not folder.is_dir():
        return None
    step = StepCheckpointer(folder, keep=KEEP).latest()
    if step is None and any(folder.rglob("*.pt")):
        raise ConfigError(
            "resume",
            str(folder),
            "holds only DeepSpeed .pt checkpoints (pickles, which can run "
            "code when loaded); they are never loaded: move them away and train without --resume",
        )
    return step


def load_state(folder: Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of committed step ``step`` (safetensors and JSON only; checksums verified)."""
    return StepCheckpointer(folder, keep=KEEP).load(step)


def commit_state(folder: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Commit step ``step`` atomically (rank 0 only) and prune older steps."""
    return StepCheckpointer(folder, keep=KEEP).commit(step, tensors, meta)


# -- gathering ----------------------------------------------------------------------------------------------------
def trainable(trainer) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the LoRA weights, in a fixed order (the same on every rank)."""
    return [(n, p) for n, p in trainer.transformer.named_parameters() if p.requires_grad]


def gather_state(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """The full training state of the run as (tensors, meta); every rank must call it (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    has_moments = bool(trainer.optimizer.state)  # Adam creates its state at the first step
    tensors = {}
    for name, p in trainable(trainer):
        tensors[f"param/{name}"] = safe_get_full_fp32_param(p).detach().float().cpu()
        for key in MOMENTS:
            full = (
                safe_get_full_optimizer_state(p, key)
                if has_moments
                else torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            )
            tensors[f"{key}/{name}"] = full.detach().float().cpu()
    tensors["adam_step"] = _adam_step(trainer.optimizer)
    tensors["rng/cpu"] = _gather_rows(torch.get_rng_state(), trainer.device)
    engine = trainer.engine
    meta = dict(
        step=trainer.step,
        world=trainer.world,
        scheduler=trainer.scheduler.state_dict(),
        lr=[group["lr"] for group in trainer.optimizer.param_groups],
        engine=dict(
            global_steps=engine.global_steps, global_samples=engine.global_samples, skipped_steps=engine.skipped_steps
        ),
    )
    return tensors, meta


def _adam_step(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """AdamW's step count (a float32 scalar, as torch keeps it): the same for every flat partition."""
    steps = {float(st["step"]) for st in optimizer.state.values() if "step" in st}
    if len(steps) > 1:
        raise InputError(f"optimizer state: partitions at different Adam steps {sorted(steps)}")
    return torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32)


def _gather_rows(row: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(world, n): every rank's ``row`` (same length everywhere), on CPU."""
    import torch.distributed as dist

    row = row.to(device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).cpu()


# -- restoring ----------------------------------------------------------------------------------------------------
def restore_state(trainer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put a loaded state into the trainer's engine, optimizer, scheduler and RNG; every rank must call it."""
    params = trainable(trainer)
    check_state(tensors, meta, params, trainer.world)
    _restore_moments(trainer, params, tensors)
    _restore_params(params, tensors)
    sched = meta["scheduler"]
    trainer.scheduler.load_state_dict(sched)
    for group, lr in zip(trainer.optimizer.param_groups, meta.get("lr") or sched["_last_lr"]):
        group["lr"] = lr
    for key, value in meta["engine"].items():
        setattr(trainer.engine, key, int(value))
    torch.set_rng_state(tensors["rng/cpu"][trainer.rank].clone())


def check_state(tensors: dict, meta: dict, params: list, world: int) -> None:
    """The checkpoint holds exactly this run's LoRA tensors with their shapes, and came from ``world`` ranks."""
    if meta.get("world") != world:
        raise ConfigError(
            "num_processes",
            world,
            f"the checkpoint was written by {meta.get('world')} ranks; "
            "resume with the same number (the data order depends on it)",
        )
    want = {f"{k}/{n}": tuple(getattr(p, "ds_shape", p.shape)) for n, p in params for k in ("param", *MOMENTS)}
    got = {k: tuple(v.shape) for k, v in tensors.items() if k.split("/")[0] in ("param", *MOMENTS)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise InputError(
            f"checkpoint step {meta.get('step')}: LoRA tensors do not match this model "
            f"(first differences, name and shape: {diff}); same lora_rank/lora_targets/model needed"
        )
    for key in ("scheduler", "engine"):
        if not isinstance(meta.get(key), dict):
            raise InputError(f"checkpoint step {meta.get('step')}: meta field {key!r} missing")


def _flat_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions this rank's ZeRO optimizer hands to AdamW (its state is keyed by them)."""
    zero = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        flats = getattr(zero, attr, None)
        if flats:
            return list(flats)
    raise ConfigError(
        "zero_optimization.stage",
        engine.zero_optimization_stage(),
        "resume supports ZeRO stages 1-3 (no flat fp32 partitions found)",
    )


def _restore_moments(trainer, params: list, tensors: dict) -> None:
    """Create AdamW's state for every flat partition and fill the moments from the full tensors.

    Each moment is written through safe_set_full_fp32_param into the (zeroed) fp32 partitions, which then hold
    it in the optimizer's layout, and copied out; the fp32 weights are written last (_restore_params)."""
    from deepspeed.utils import safe_set_full_fp32_param

    flats = _flat_partitions(trainer.engine)
    step = tensors["adam_step"].clone()
    for key in MOMENTS:
        for flat in flats:
            flat.data.zero_()
        for name, p in params:
            safe_set_full_fp32_param(p, tensors[f"{key}/{name}"].to(flats[0].device))
        for flat in flats:
            trainer.optimizer.state[flat][key] = flat.detach().clone()
    for flat in flats:
        trainer.optimizer.state[flat]["step"] = step.clone()
        flat.data.zero_()


def _restore_params(params: list, tensors: dict) -> None:
    """The fp32 master weights (ZeRO partitions) and the model's own copy (gathered, then re-partitioned)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in params:
        safe_set_full_fp32_param(p, tensors[f"param/{name}"].to(p.device))
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):  # ZeRO-2: a no-op
        with torch.no_grad():
            for name, p in params:
                p.data.copy_(tensors[f"param/{name}"].to(p.device, p.dtype).view_as(p.data))
