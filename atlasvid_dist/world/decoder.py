"""`atlasvid-dist world decoder`: run the recipe's decoder-only VAE stage (``train.decoder_stage``) on a model folder
made without it, in place.

The stage freezes the encoder, so the latents the transformer and the adapters were trained on do not change: the
folder afterwards holds what `world train` with the stage would have made (the same code, seed and draws), without
re-training the rest. The folder must record a budget equal to the one asked for in everything but the stage's own
fields, and must not have had the stage; its checkpoints go under FOLDER/checkpoints/vae_decoder (resumable).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, check
from .train import BUDGETS, WorldBudget, decoder_stage

DECODER_FIELDS = ("vae_decoder_steps", "vae_decoder_lr")
"""The budget's fields that belong to the decoder stage."""


@dataclass(frozen=True)
class WorldDecoderConfig:
    """One `world decoder` run."""

    model: str
    """A model folder made by `world train` (its atlasvid_model.json records the budget and seed)."""
    budget: str = "full"
    """The budget whose decoder stage to run ('full' has it); the folder's other budget fields must equal its."""

    def __post_init__(self) -> None:
        check(self.budget in BUDGETS, "budget", self.budget, f"must be one of {'|'.join(BUDGETS)}")
        check(BUDGETS[self.budget].vae_decoder_steps > 0, "budget", self.budget, "has no decoder stage")


def _recorded(folder: Path) -> dict:
    from ..models.loading import read_model_defaults

    check(folder.is_dir() and (folder / "vae").is_dir(), "model", str(folder), "must be a model folder with vae/")
    defaults = read_model_defaults(folder)
    if not isinstance(defaults.get("trained_on"), dict) or "seed" not in defaults:
        raise ConfigError("model", str(folder), "records no budget and seed: not made by `world train`")
    return defaults


def _check_budget(folder: Path, recorded: dict, plan: WorldBudget) -> None:
    if recorded.get("vae_decoder_steps"):
        raise ConfigError("model", str(folder), "has had the decoder stage already")
    wanted = {k: v for k, v in asdict(plan).items() if k not in DECODER_FIELDS}
    if any(wanted.get(k) != v for k, v in recorded.items() if k not in DECODER_FIELDS):
        raise ConfigError("budget", str(folder), "the folder was trained on another budget than the one asked for")


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
    _check_budget(folder, defaults["trained_on"], plan)
    vae = _load_vae(folder / "vae")
    start = time.perf_counter()
    seconds = decoder_stage(folder, vae, plan, int(defaults["seed"]), log)
    vae.eval().save_pretrained(folder / "vae", safe_serialization=True)
    defaults["trained_on"].update({k: getattr(plan, k) for k in DECODER_FIELDS})
    defaults.setdefault("seconds", {})["vae_decoder"] = round(seconds, 1)
    write_defaults(folder, defaults)
    _apply_umask_tree(folder)
    log(f"vae_decoder: {folder / 'vae'} saved ({time.perf_counter() - start:.0f} s)")
    return defaults


__all__ = ["DECODER_FIELDS", "WorldDecoderConfig", "finetune_decoder"]
