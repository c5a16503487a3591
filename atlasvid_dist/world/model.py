"""The parts of the shapes model (`world train`): configs, a word-level tokenizer over the world's vocabulary, the
frozen UMT5 text encoder, and the folder's own defaults file.

Shapes stay Wan-compatible: the VAE is diffusers' AutoencoderKLWan (z_dim 16, 8x spatial by three downsamples,
4x temporal), the transformer diffusers' WanTransformer3DModel (patch 1x2x2, full attention), the text encoder a
UMT5 encoder whose d_model equals the transformer's text_dim. Only the widths and depths are small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .scene import COLOURS, DIRECTIONS, SHAPES

SHAPES_VAE_CONFIG = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
)
"""Channels 8/16/32/32 from full to 1/8 resolution: cheap at full size, the capacity where the latent lives."""
SHAPES_TEXT_DIM = 32
"""UMT5 d_model = the transformer's text_dim."""
SHAPES_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=SHAPES_TEXT_DIM,
    freq_dim=256,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
SHAPES_TEXT_LEN = 16
"""Tokenizer model_max_length: generate pads prompts to this (captions are 6 tokens with </s>)."""
FLOW_SHIFT = 3.0
"""Wan's shift of the noise level, in training (sigma sampling) and in the saved scheduler."""
_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary


def world_vocabulary() -> list[str]:
    """Every word a caption can hold, in a fixed order."""
    return ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]


def build_world_tokenizer():
    """Word-level tokenizer (lower-cased, split on whitespace and punctuation, ``</s>`` appended as in T5); words
    outside the world's vocabulary become ``<unk>``. Round-trips through save_pretrained / AutoTokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *world_vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=SHAPES_TEXT_LEN,
    )


def build_text_encoder(vocab_size: int, seed: int):
    """A small UMT5 encoder with random weights drawn from ``seed``; it stays frozen (the transformer learns to read
    its fixed embeddings)."""
    from ..models.tiny import small_umt5_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return small_umt5_encoder(vocab_size, SHAPES_TEXT_DIM).eval().requires_grad_(False)


def build_vae(seed: int):
    """The shapes VAE with He-normal conv weights and zero biases (see ``init_vae``), drawn from ``seed``."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return init_vae(AutoencoderKLWan(**SHAPES_VAE_CONFIG))


def init_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every conv's weights He-normal (fan-in) and zero its bias (convs that start at zero stay zero), then
    inflate the causal 3D convs from their 2D last-frame slice (see ``inflate_time``).

    Measured on eight 128 px world frames: with PyTorch's default conv init the biases and the dark background
    dominate every layer, so the latent barely depends on the image (std across images 0.007 against 0.13 within
    one) and training falls into the image-independent "background only" solution (MSE 0.0435, flat gradients,
    still there after 80 steps). With this init the latent's spread across images is 0.18 and the same overfit
    reaches MSE 0.015 in 40 steps."""
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and bool(module.weight.any()):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return inflate_time(vae)


@torch.no_grad()
def inflate_time(vae: torch.nn.Module) -> torch.nn.Module:
    """Start every causal conv as a per-frame (2D) conv: earlier-frame taps zero, so the VAE first acts frame by
    frame and its temporal path starts from the image model instead of from noise.

    A single frame only reaches a causal conv's last temporal tap (the earlier ones see the zero padding), so the
    VAE's image phase trains exactly those taps; with random earlier taps the first window step added noise from
    every cached frame (window loss 0.34 against 0.007 at the end of the image phase). The temporal resamplers
    start as the plain operation: the decoder's time_conv (C -> 2C, doubling the frame rate) repeats each frame,
    the encoder's (stride 2) averages each pair of frames."""
    for name, module in vae.named_modules():
        if not isinstance(module, torch.nn.Conv3d) or module.kernel_size[0] == 1:
            continue
        weight = module.weight  # (C_out, C_in, kt, kh, kw)
        if name.endswith("time_conv"):
            eye = torch.eye(weight.shape[1]).view(weight.shape[1], weight.shape[1], 1, 1)  # (C, C, 1, 1)
            weight.zero_()
            if weight.shape[0] == 2 * weight.shape[1]:  # upsample: both output frames copy the input frame
                weight[:, :, -1] = torch.cat([eye, eye])
            else:  # downsample: mean of the last two frames in the window
                weight[:, :, -2:] = 0.5 * eye.unsqueeze(2)
            if module.bias is not None:
                module.bias.zero_()
        else:
            weight[:, :, :-1] = 0.0
    return vae


def build_transformer(seed: int, heads: int = 4, ffn_dim: int = 256):
    """The shapes transformer: SHAPES_TRANSFORMER_CONFIG with ``heads`` heads of 32 channels and an FFN of
    ``ffn_dim`` (the budget's width), weights drawn from ``seed``."""
    from diffusers import WanTransformer3DModel

    config = {**SHAPES_TRANSFORMER_CONFIG, "num_attention_heads": heads, "ffn_dim": ffn_dim}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)


def build_scheduler():
    """UniPC with flow sigmas, as the tiny model and the released Wan folders, at FLOW_SHIFT."""
    from diffusers import UniPCMultistepScheduler

    from ..models.tiny import TINY_SCHEDULER_CONFIG

    return UniPCMultistepScheduler(**{**TINY_SCHEDULER_CONFIG, "flow_shift": FLOW_SHIFT})


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_defaults(folder: str | os.PathLike, defaults: dict) -> Path:
    """Write DEFAULTS_FILE (the model's base size, window, scales, how it was trained) into ``folder``."""
    from ..models.loading import DEFAULTS_FILE

    path = Path(folder) / DEFAULTS_FILE
    path.write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")
    return path
