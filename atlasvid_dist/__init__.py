"""atlasvid-dist: distributed AtlasVid generation on Wan2.1 (Ray) and its LoRA training (DeepSpeed ZeRO).

Public API::

    from atlasvid_dist import AtlasConfig, AtlasTransformer
"""

from .config.method import AtlasConfig
from .errors import AtlasError, ConfigError, InputError, ModelLoadError, PlanError, RunFailure

__all__ = ["AtlasConfig", "AtlasTransformer", "AtlasError", "ConfigError", "InputError", "ModelLoadError",
           "PlanError", "RunFailure"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the config layer must not import diffusers
    if name == "AtlasTransformer":
        from .models.atlas_transformer import AtlasTransformer

        return AtlasTransformer
    raise AttributeError(name)
