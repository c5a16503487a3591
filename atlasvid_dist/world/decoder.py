"""`atlasvid-dist world decoder`: run the recipe's decoder-only VAE stages (``train.decoder_stage``: ``vae_decoder``
then ``vae_decoder_base``) that a model folder was made without, in place.

The stages freeze the encoder, so the latents the transformer and the adapters were trained on do not change: the
folder afterwards holds what `world train` with the stages would have made (the same code, seed and draws), without
re-training the rest. The folder must record a budget equal to the one asked for in everything but the stages' own
fields, and must lack at least the last stage; a stage it records with the budget's steps is kept, one it records
with other steps is refused. Checkpoints go under FOLDER/checkpoints/<stage> (resumable).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, check
from .train import BUDGETS, DECODER_STAGES, WorldBudget, decoder_stage

PHASE_FIELDS = tuple(f"{name}_steps" for name in DECODER_STAGES)
"""The decoder stages' step counts, in the order they run."""
DECODER_FIELDS = (*PHASE_FIELDS, "vae_decoder_lr")
"""The budget's fields that belong to the decoder stages."""


@dataclass(frozen=True)
class WorldDecoderConfig:
    """One `world decoder` run."""

    model: str
    """A model folder made by `world train` (its atlasvid_model.json records the budget and seed)."""
    budget: str = "full"
    """The budget whose decoder stage to run ('full' has it); the folder's other budget fields must equal its."""

    def __post_init__(self) -> None:
        check(self.budget in BUDGETS, "budget", self.budget, f"must be one of {'|'.join(BUDGETS)}")
        check(
            any(getattr(BUDGETS[self.budget], k) for k in PHASE_FIELDS), "budget", self.budget, "has no decoder stage"
        )


def _recorded(folder: Path) -> dict:
    from ..models.loading import read_model_defaults

    check(folder.is_dir() and (folder / "vae").is_dir(), "model", str(folder), "must be a model folder with vae/")
    defaults = read_model_defaults(folder)
    if not isinstance(defaults.get("trained_on"), dict) or "seed" not in defaults:
        raise ConfigError("model", str(folder), "records no budget and seed: not made by `world train`")
    return defaults


def _todo(folder: Path, recorded: dict, plan: WorldBudget) -> WorldBudget:
    """The budget's decoder stages the folder lacks (a stage it has gets 0 steps); ConfigError if the folder was
    trained on another budget or has them all."""
    wanted = {k: v for k, v in asdict(plan).items() if k not in DECODER_FIELDS}
    if any(wanted.get(k) != v for k, v in recorded.items() if k not in DECODER_FIELDS):
        raise ConfigError("budget", str(folder), "the folder was trained on another budget than the one asked for")
    had = [recorded.get(k, 0) for k in PHASE_FIELDS]  # folders older than a stage do not record it
    asked = [getattr(plan, k) for k in PHASE_FIELDS]
    done = [bool(h) for h in had]
    if any(h not in (0, a) for h, a in zip(had, asked)) or done != sorted(done, reverse=True):
        raise ConfigError("budget", str(folder), f"the folder's decoder steps {had} are not a start of {asked}")
    if not any(a and not h for h, a in zip(had, asked)):
        raise ConfigError("model", str(folder), "has had the decoder stages already")
    return replace(plan, **{k: 0 for k, h in zip(PHASE_FIELDS, had) if h})


def _load_vae(folder: Path):
    """The folder's AutoencoderKLWan, built from its config without diffusers' loader, which would record the
    folder's path in the config it saves."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    config = {k: v for k, v in AutoencoderKLWan.load_config(folder).items() if not k.startswith("_")}
    vae = AutoencoderKLWan.from_config(config)
    vae.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    return vae


def finetune_decoder(cfg: WorldDecoderConfig, log: Callable[[str], None] = print) -> dict:
    """Run the decoder stage on cfg.model's VAE and save it in place; returns the updated atlasvid_model.json."""
    from ..models.tiny import _apply_umask_tree
    from .model import write_defaults

    folder, plan = Path(cfg.model), BUDGETS[cfg.budget]
    defaults = _recorded(folder)
    todo = _todo(folder, defaults["trained_on"], plan)
    vae = _load_vae(folder / "vae")
    start = time.perf_counter()
    seconds = decoder_stage(folder, vae, todo, int(defaults["seed"]), log)
    vae.eval().save_pretrained(folder / "vae", safe_serialization=True)
    defaults["trained_on"].update({k: getattr(plan, k) for k in DECODER_FIELDS})
    defaults.setdefault("seconds", {}).update({k: round(v, 1) for k, v in seconds.items()})
    write_defaults(folder, defaults)
    _apply_umask_tree(folder)
    log(f"vae_decoder: {folder / 'vae'} saved ({time.perf_counter() - start:.0f} s)")
    return defaults


__all__ = ["DECODER_FIELDS", "PHASE_FIELDS", "WorldDecoderConfig", "finetune_decoder"]
