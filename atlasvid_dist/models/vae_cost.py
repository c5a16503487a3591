"""What one tile of a Wan VAE decode costs, traced from the VAE's config on the meta device (no weights, no compute).

The decode (``pipeline.decode``) runs the decoder one latent frame at a time with its causal-conv cache. Running
exactly that on meta tensors under a dispatch mode that tracks every live tensor storage gives, for any
``AutoencoderKLWan`` config (Wan2.1's 127 M-parameter VAE, the tiny model's, the shapes model's):

- the activations of one latent frame's decode, per output pixel of the tile (the peak of live storages minus what
  was live before the call: the latent and the cache);
- the causal cache the tile keeps between latent frames, per latent cell;
- the FLOPs per output pixel-frame (``torch.utils.flop_counter``).

Attention (the decoder's middle block) is counted as a fused kernel: only its output is materialised, as flash
attention on CUDA and the CPU flash kernel do (a meta tensor would otherwise take the math path and its score
matrix). Convolution libraries add workspace inside the op, storage a dispatch mode does not see (oneDNN on CPU
copies a convolution's input and output into blocked layouts; cuDNN takes workspaces): the trace records the
largest convolution's input + output, and the device profile prices the workspace against it.

    trace_decode(AutoencoderKLWan.load_config(folder))   # VaeDecodeCost(bytes_per_tile_pixel=..., ...)
"""

from __future__ import annotations

import functools
import json

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..config.model import VaeDecodeCost
from .memory import LiveStorages

TRACE_CELLS = 16
"""Side of the square tile traced, in latent cells. Bytes per pixel do not depend on it (attention fused); the
middle block's attention FLOPs per pixel grow with the tile, by 0.06% (Wan2.1's VAE) to 1.3% (the tiny one) at the
decode's default 32-cell tile: not worth the trace's time (a 32-cell trace of Wan2.1's VAE takes seconds)."""


def decode_latent_frame(vae, z: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
    """One latent frame (B, C, 1, h, w), VAE space, through post_quant_conv and the decoder with the causal
    ``cache`` (a list with one slot per causal conv, updated in place): pixels (B, 3, n, h*s, w*s), n = 1 for the
    first frame else the temporal factor; unclamped."""
    x = vae.post_quant_conv(z)
    out = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out


def causal_conv_count(vae) -> int:
    """Causal convs in the decoder (the cache's length)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


class _FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as a fused kernel: its output only (shape of q with v's last dim); its FLOPs
    (two matmuls) are added up in ``flops``."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.flops += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **(kwargs or {}))


def trace_decode(vae_config: dict, cells: int = TRACE_CELLS) -> VaeDecodeCost:
    """The decode cost of an AutoencoderKLWan with this config (``AutoencoderKLWan.load_config(folder)`` or the
    keyword arguments it was built with), traced on meta tensors: a ``cells`` x ``cells`` tile, latent frames 0, 1,
    2; the figures are those of frame 2 (a steady-state frame: full cache, the temporal factor's output frames)."""
    return _trace(json.dumps(dict(vae_config), sort_keys=True, default=str), cells)


@functools.lru_cache(maxsize=16)
def _trace(config_json: str, cells: int) -> VaeDecodeCost:
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(config)
    n = cells
    z = torch.zeros(1, vae.config.z_dim, 1, n, n, device="meta")
    cache: list = [None] * causal_conv_count(vae)
    with torch.no_grad(), _FusedAttention() as attention, LiveStorages() as live:
        decode_latent_frame(vae, z, cache, first=True)
        decode_latent_frame(vae, z, cache, first=False)
        state = sum(c.untyped_storage().nbytes() for c in cache if isinstance(c, torch.Tensor))
        before, attention.flops = live.restart_peak(), 0
        with FlopCounterMode(display=False) as flops:
            out = decode_latent_frame(vae, z, cache, first=False)  # (1, 3, frames, H, W)
    pixels = out.shape[-1] * out.shape[-2]
    return VaeDecodeCost(
        bytes_per_tile_pixel=round((live.peak - before) / pixels),
        conv_io_bytes_per_tile_pixel=round(live.conv_io / pixels),
        state_bytes_per_cell=round(state / (n * n)),
        flops_per_pixel=(flops.get_total_flops() + attention.flops) / (pixels * out.shape[2]),
    )
