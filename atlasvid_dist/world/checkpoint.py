"""Per-stage checkpoints of `world train`: weights and Adam moments in safetensors, progress in JSON (no pickle).

Layout: ``OUTPUT/checkpoints/<stage>/state.json`` names the committed ``state-<step>.safetensors``; the JSON is
written (atomically, by rename) after the tensors, so a stop between the two leaves the previous commit valid.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError

CHECKPOINTS = "checkpoints"
STATE_JSON = "state.json"


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
    file: str = ""
    """The committed safetensors file (relative to the stage folder)."""


def stage_dir(output: Path, name: str) -> Path:
    return Path(output) / CHECKPOINTS / name


def read_stage(folder: Path) -> tuple[StageState, dict[str, torch.Tensor]]:
    """The committed state and its tensors (empty state and no tensors when nothing is committed)."""
    from safetensors.torch import load_file

    path = folder / STATE_JSON
    if not path.is_file():
        return StageState(), {}
    try:
        state = StageState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a world-train stage state ({e})") from None
    if not state.file:
        return state, {}
    from ..models.loading import check_safetensors_file

    check_safetensors_file(folder / state.file)
    return state, load_file(str(folder / state.file))


def commit_stage(folder: Path, state: StageState, tensors: dict[str, torch.Tensor]) -> None:
    """Write the tensors, then the JSON naming them (atomic rename), then drop older tensor files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if tensors:
        state.file = f"state-{state.step:07d}.safetensors"
        tmp = folder / f".{state.file}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, folder / state.file)
    tmp = folder / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps(asdict(state)) + "\n")
    os.replace(tmp, folder / STATE_JSON)
    for old in folder.glob("state-*.safetensors"):
        if old.name != state.file:
            old.unlink()


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
