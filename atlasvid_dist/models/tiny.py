"""The built-in tiny Wan2.1 text-to-video model: every part built in code, offline, deterministic from a seed.

Shapes are diffusers' own Wan test shapes (2 layers, 2 heads x 12, text dim 32, ffn 32, 16 latent channels), so
the whole pipeline (tokenize -> UMT5 -> DiT -> VAE) runs on a CPU in seconds. Weights are random: the tiny model
tests plumbing, numerics and distribution, never image quality.

Choices and compromises:
- Tokenizer: byte-level BPE with no merges (every UTF-8 byte is a token) plus ``<pad>=0``, ``</s>=1``,
  ``<unk>=2`` as T5 numbers them, and ``</s>`` appended like T5. Any prompt maps to distinct ids, no download.
- Scheduler: ``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift=3.0``, the configuration shipped in
  the diffusers-format Wan2.1 T2V folders (diffusers' ``WanPipeline`` annotates FlowMatchEulerDiscreteScheduler but
  its docs and the released folders use UniPC). ``pipeline.sampling.fresh_scheduler`` changes the shift per stage.
- VAE: a randomly initialised AutoencoderKLWan with PyTorch's default init decodes nearly constant frames (per
  frame spatial std ~0.03 and almost no dependence on the latent). Its convolutions are re-drawn with a
  variance-preserving init (std 1/sqrt(fan_in), zero bias), which decodes frames with spatial std ~0.4 that change
  with the latent, so a video made with the tiny model visibly varies.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import check
from ..pipeline.outputs import apply_umask

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
TINY_VAE_CONFIG = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)
TINY_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)
TINY_TEXT_DIM = 32
"""UMT5 d_model; equals the transformer's text_dim."""
_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary


def build_tiny_tokenizer():
    """Byte-level tokenizer built in process (no download); round-trips through save_pretrained/AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG)


def _tiny_text_encoder(vocab_size: int):
    return small_umt5_encoder(vocab_size, TINY_TEXT_DIM)


def small_umt5_encoder(vocab_size: int, d_model: int):
    """A 2-layer UMT5 encoder (random weights from torch's current RNG): the built-in model's and the shapes
    world's text encoder."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(cfg)


@torch.no_grad()
def _variance_preserving_convs(module: torch.nn.Module) -> None:
    """Re-draw every convolution with std 1/sqrt(fan_in) and zero bias, in module order (see module docstring)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()


def build_tiny_transformer(seed: int = 0):
    """The tiny transformer alone; identical to ``build_tiny_components(seed)["transformer"]``."""
    from diffusers import WanTransformer3DModel

    check(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "must be an integer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()


def build_tiny_components(seed: int = 0) -> dict:
    """Transformer, VAE, text encoder, tokenizer and scheduler of the tiny model; same seed -> identical weights.

    The global torch RNG state is left as it was (weights are drawn inside a forked RNG).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    check(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "must be an integer")
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)  # first draw: as build_tiny_transformer
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        _variance_preserving_convs(vae)
        text_encoder = _tiny_text_encoder(len(tokenizer))
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=build_tiny_scheduler(),
    )


def _apply_umask_tree(root: Path) -> None:
    """Every folder and file under ``root`` (and root) gets the mode mkdir / open() would give it."""
    for p in [root, *root.rglob("*")]:
        apply_umask(p, 0o777 if p.is_dir() else 0o666)


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers-format WanPipeline folder (safetensors weights); returns its path.

    Written to a temporary sibling and renamed when complete; an existing non-empty folder is refused.
    """
    from diffusers import WanPipeline

    out = Path(path)
    check(
        not out.exists() or (out.is_dir() and not any(out.iterdir())),
        "path",
        str(out),
        "must not exist or be an empty folder",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        WanPipeline(**build_tiny_components(seed)).save_pretrained(tmp, safe_serialization=True)
        _apply_umask_tree(tmp)  # mkdtemp makes it 0700, save_pretrained's safetensors 0600
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
