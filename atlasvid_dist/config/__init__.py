"""Layer 1: frozen, self-validating configuration dataclasses (no torch.distributed, no model code)."""

from .method import AtlasConfig
from .model import MODEL_PRESETS, ModelSpec, model_preset
from .video import RESOLUTION_PRESETS, VideoSpec, parse_resolution

__all__ = [
    "AtlasConfig",
    "ModelSpec",
    "MODEL_PRESETS",
    "model_preset",
    "VideoSpec",
    "RESOLUTION_PRESETS",
    "parse_resolution",
]
