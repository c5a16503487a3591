"""The clean proxy's keys/values as the detail stage reads them: one function for generation and for training.

Generation runs the proxy path with the stage-1 adapter (the proxy *is* the stage-1 model's output, and the
detail windows were trained to read that model's keys/values), without gradients, at timestep 0. Stage-2
training calls the same function with the frozen stage-1 adapter, so the detail adapter is trained on exactly
the keys/values it reads at generation.
"""

from __future__ import annotations

import torch

from ..models import lora


def proxy_cache_for(atlas, proxy: torch.Tensor, text: torch.Tensor, adapter: str | None, keep=None):
    """``atlas.build_proxy_cache(proxy, text, keep)`` without gradients, with ``adapter`` the only active LoRA
    (None: the base weights). The adapter stays active afterwards; the caller activates the detail adapter."""
    lora.set_active_adapter(atlas.transformer, adapter)
    with torch.no_grad():
        return atlas.build_proxy_cache(proxy, text, keep)
