"""Text encoding cleans prompts exactly as diffusers' WanPipeline does, and the default negative prompt is Wan's."""

import torch

from atlasvid_dist.cli.generate import DEFAULTS
from atlasvid_dist.config.generate import WAN_NEGATIVE_PROMPT, GenerateConfig
from atlasvid_dist.config.method import AtlasConfig
from atlasvid_dist.models.tiny import build_tiny_components
from atlasvid_dist.pipeline.text import encode_prompts

MESSY = "  a red&amp;amp;fox \n\t runs   through&nbsp;snow  "


def test_messy_prompt_embeds_like_diffusers_wan_pipeline():
    from diffusers import WanPipeline

    parts = build_tiny_components(0)
    pipe = WanPipeline(**parts)
    ours = encode_prompts(
        parts["tokenizer"],
        parts["text_encoder"],
        MESSY,
        "  blurry\n\nugly ",
        max_length=64,
        use_cfg=True,
        device="cpu",
        dtype=torch.float32,
    )
    ref = pipe._get_t5_prompt_embeds(
        [MESSY, "  blurry\n\nugly "], max_sequence_length=64, device=torch.device("cpu"), dtype=torch.float32
    )
    torch.testing.assert_close(ours.cond, ref[:1], rtol=0, atol=1e-5)  # same tokens; float noise of the batch
    torch.testing.assert_close(ours.uncond, ref[1:], rtol=0, atol=1e-5)
    raw = parts["tokenizer"]([MESSY], padding="max_length", max_length=64, return_tensors="pt").attention_mask.sum()
    assert int(raw) > int((ours.cond.abs().sum(-1) > 0).sum())  # cleaning removed tokens


def test_default_negative_prompt_is_wans_and_documented():
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    assert (
        GenerateConfig(prompt="x", method=AtlasConfig(mode="full")).negative_prompt
        == DEFAULTS["negative_prompt"]
        == WAN_NEGATIVE_PROMPT
    )
    from pathlib import Path

    assert WAN_NEGATIVE_PROMPT in (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
