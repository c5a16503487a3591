"""Per-stage checkpoints of `world train`: weights and Adam moments in safetensors, progress in JSON (no pickle).

Each stage folder ``OUTPUT/checkpoints/<stage>/`` is a :class:`~atlasvid_dist.pipeline.checkpoint.StepCheckpointer`
folder (the project's one committed-step format: a marker written last, sizes and sha256 checked on load), keeping
the newest commit only; the stage's progress is the commit's JSON meta.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError

CHECKPOINTS = "checkpoints"


@dataclass
class StageState:
    """Progress of one stage."""

    step: int = 0
    """Optimizer steps done (or 1 for a stage without steps once done)."""
    done: bool = False
    """The stage finished; a resume skips it."""
    seconds: float = 0.0
    """Wall time spent in the stage, summed over resumes."""
    losses: list = field(default_factory=list)
    """(step, loss) pairs logged so far."""


def stage_dir(output: Path, name: str) -> Path:
    return Path(output) / CHECKPOINTS / name


def read_stage(folder: Path) -> tuple[StageState, dict[str, torch.Tensor]]:
    """The committed state and its tensors (empty state and no tensors when nothing is committed)."""
    from ..pipeline.checkpoint import StepCheckpointer

    if not folder.is_dir():
        return StageState(), {}
    ckpt = StepCheckpointer(folder, keep=1)
    step = ckpt.latest()
    if step is None:
        return StageState(), {}
    tensors, meta = ckpt.load(step)
    try:
        return StageState(**meta), tensors
    except TypeError as e:
        raise ModelLoadError(f"{folder}: not a world-train stage state ({e})") from None


def commit_stage(folder: Path, state: StageState, tensors: dict[str, torch.Tensor]) -> None:
    """Commit the stage's tensors and progress as its newest step (older commits are dropped)."""
    from ..pipeline.checkpoint import StepCheckpointer

    StepCheckpointer(folder, keep=1).commit(state.step, tensors, asdict(state))


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as ``opt.<index>.<name>`` tensors."""
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore(module: torch.nn.Module, opt: torch.optim.Optimizer | None, tensors: dict, prefix: str) -> None:
    """Load ``prefix.*`` into the module and ``opt.*`` into the optimizer (its param groups kept)."""
    module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    if opt is None:
        return
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
