"""Flow-matching sampling as Wan uses it (diffusers schedulers with a flow shift), classifier-free guidance, and
exact scheduler state capture so a run can stop after any step and resume to the identical result.

Scheduler state is saved without pickle: tensors (including lists of tensors, e.g. UniPC's model-output history)
go to a tensor dict for safetensors, everything else to a JSON-able dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import check

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SKIP = {"config", "_internal_dict"}


@dataclass(frozen=True)
class SamplerConfig:
    """Denoising settings of one stage."""

    steps: int
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale; <= 1 disables the unconditional pass."""
    flow_shift: float = 3.0
    """Flow-matching timestep shift (Wan: 3.0 at 480P, 5.0 at 720P and above)."""

    def __post_init__(self) -> None:
        check(
            isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
            "steps",
            self.steps,
            "must be an integer >= 1",
        )
        check(
            isinstance(self.guidance, (int, float)) and self.guidance >= 0,
            "guidance",
            self.guidance,
            "must be a number >= 0",
        )
        check(
            isinstance(self.flow_shift, (int, float)) and self.flow_shift > 0,
            "flow_shift",
            self.flow_shift,
            "must be a number > 0",
        )

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0


def fresh_scheduler(template, flow_shift: float):
    """A new scheduler of the template's class and config, with the given flow shift."""
    cfg = dict(template.config)
    if "flow_shift" in cfg:
        cfg["flow_shift"] = float(flow_shift)
    elif "shift" in cfg:
        cfg["shift"] = float(flow_shift)
    return type(template).from_config(cfg)


def guided(cond: Velocity, uncond: Velocity | None, scale: float, min_t: float | None = None) -> Velocity:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (plain cond when uncond is None).

    ``min_t``: guidance only at timesteps >= min_t (CFG truncation: the noisy early steps); below it the
    velocity is cond alone, one forward instead of two. None: at every timestep.
    """
    if uncond is None:
        return cond

    def velocity(latents, t):
        c = cond(latents, t)
        if min_t is not None and float(t.max()) < min_t:
            return c
        u = uncond(latents, t)
        return u + scale * (c - u)

    return velocity


def denoise(
    velocity: Velocity,
    latents: torch.Tensor,
    scheduler,
    steps: int,
    *,
    start: int = 0,
    on_step: Callable[[int, torch.Tensor, object], None] | None = None,
    stop_after: int | None = None,
) -> torch.Tensor:
    """Run steps ``start .. steps-1`` (the scheduler must hold the state of step ``start``; see restore).

    ``on_step(done, latents, scheduler)`` is called after each step with the number of steps done (a checkpoint
    hook). ``stop_after`` ends early after that many steps in total (tests, staged runs).
    """
    for i in range(start, steps):
        t = scheduler.timesteps[i]
        v = velocity(latents, t.expand(latents.shape[0]).to(latents.device))
        latents = scheduler.step(v.to(latents.dtype), t, latents, return_dict=False)[0]
        del v  # not held through the next step's forwards (one latent-sized tensor less at the peak)
        if on_step is not None:
            on_step(i + 1, latents, scheduler)
        if stop_after is not None and i + 1 >= stop_after:
            break
    return latents


def start_scheduler(template, cfg: SamplerConfig, device) -> object:
    sched = fresh_scheduler(template, cfg.flow_shift)
    sched.set_timesteps(cfg.steps, device=device)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched


def scheduler_state(scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) capturing every attribute of the scheduler except its config."""
    tensors, meta = {}, {}
    for key, value in vars(scheduler).items():
        if key in _SKIP:
            continue
        meta[key] = _encode(f"sched.{key}", value, tensors)
    return tensors, meta


def restore_scheduler(scheduler, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    for key, enc in meta.items():
        setattr(scheduler, key, _decode(enc, tensors, scheduler))


def _encode(name: str, value, tensors: dict):
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().clone()  # own storage: views (timestep_list) share memory
        return {"tensor": name, "device": str(value.device)}
    if isinstance(value, np.ndarray):
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        return {"ndarray": name}
    if isinstance(value, (list, tuple)):
        return {
            "list": [_encode(f"{name}.{i}", v, tensors) for i, v in enumerate(value)],
            "tuple": isinstance(value, tuple),
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (np.integer, np.floating)):
        return {"value": value.item()}
    raise TypeError(f"scheduler attribute {name} of type {type(value).__name__} cannot be checkpointed")


def _decode(enc: dict, tensors: dict, scheduler):
    if "tensor" in enc:
        return tensors[enc["tensor"]].to(enc["device"])
    if "ndarray" in enc:
        return tensors[enc["ndarray"]].numpy()
    if "list" in enc:
        items = [_decode(e, tensors, scheduler) for e in enc["list"]]
        return tuple(items) if enc["tuple"] else items
    return enc["value"]


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()
