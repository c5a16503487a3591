"""atlasvid-dist: distributed AtlasVid generation on Wan2.1 (Ray) and its LoRA training (DeepSpeed ZeRO).

Public API::

    from atlasvid_dist import AtlasConfig, AtlasTransformer, AtlasVidPipeline

    pipe = AtlasVidPipeline.from_pretrained("tiny")   # or a folder, or a cached id such as "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    frames = pipe("a red fox", height=256, width=256, num_frames=9, num_inference_steps=2, window="3,8,8").frames
"""

from .config.method import AtlasConfig
from .errors import AtlasError, ConfigError, InputError, ModelLoadError, PlanError, RunFailure

__all__ = [
    "AtlasConfig",
    "AtlasTransformer",
    "AtlasVidPipeline",
    "AtlasError",
    "ConfigError",
    "InputError",
    "ModelLoadError",
    "PlanError",
    "RunFailure",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the config layer must not import diffusers
    if name == "AtlasTransformer":
        from .models.atlas_transformer import AtlasTransformer

        return AtlasTransformer
    if name == "AtlasVidPipeline":
        from .pipeline.api import AtlasVidPipeline

        return AtlasVidPipeline
    raise AttributeError(name)
