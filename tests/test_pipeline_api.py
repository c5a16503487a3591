"""The library entry points: AtlasVidPipeline (load once, call, get uint8 frames) runs the project's generator, and
AtlasTransformer stands in for the transformer of a diffusers WanPipeline."""

import numpy as np
import pytest
import torch

from atlasvid_dist import AtlasConfig, AtlasTransformer, AtlasVidPipeline
from atlasvid_dist.errors import ConfigError, ModelLoadError

SMALL = dict(height=256, width=256, num_frames=9, num_inference_steps=1, window="3,8,8", spatial_scale=2)


@pytest.fixture(scope="module")
def pipe():
    return AtlasVidPipeline.from_pretrained("tiny")


@pytest.mark.slow  # generates twice; the next test keeps one pipeline run fast
def test_pipeline_call_equals_cli_generator(pipe, tmp_path):
    from atlasvid_dist.cli.main import main
    from atlasvid_dist.pipeline.video_io import read_mp4

    frames = pipe("a red ball rolling", **SMALL).frames
    assert frames.dtype == np.uint8 and frames.shape == (9, 256, 256, 3) and frames.std() > 1.0
    out = tmp_path / "cli.mp4"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "generate",
                "--prompt",
                "a red ball rolling",
                "--res",
                "256x256",
                "--frames",
                "9",
                "--steps",
                "1",
                "--proxy-steps",
                "1",
                "--window",
                "3,8,8",
                "--spatial-scale",
                "2",
                "--crf",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
    assert e.value.code in (0, None)
    assert np.array_equal(read_mp4(out), frames)  # same generator, same defaults; lossless file


def test_pipeline_writes_mp4_and_refuses_bad_options(pipe, tmp_path):
    from atlasvid_dist.pipeline.video_io import probe_mp4

    result = pipe("a kite", output_path=str(tmp_path / "kite.mp4"), seed=1, **SMALL)
    info = probe_mp4(tmp_path / "kite.mp4")
    assert result.path == str(tmp_path / "kite.mp4") and (info.frames, info.width) == (9, 256)
    assert result.frames.shape == (9, 256, 256, 3)
    with pytest.raises(ConfigError, match="model"):
        pipe("x", model="other", **SMALL)
    with pytest.raises(ConfigError, match="windw"):
        pipe("x", windw="3,8,8", **SMALL)
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        AtlasVidPipeline.from_pretrained("tiny", lora_stage2=str(tmp_path / "nope.safetensors"))


def test_atlas_transformer_stands_in_wan_pipeline():
    from diffusers import WanPipeline

    from atlasvid_dist.models.tiny import build_tiny_components

    parts = build_tiny_components(0)
    atlas = AtlasTransformer(parts["transformer"], AtlasConfig(mode="full"))
    assert atlas.config.in_channels == 16 and atlas.atlas_config.mode == "full"
    assert atlas.dtype == torch.float32 and atlas.device.type == "cpu"
    kw = dict(
        negative_prompt="",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=1,
        max_sequence_length=16,
        output_type="pt",
    )
    ours = WanPipeline(**{**parts, "transformer": atlas})(
        "a red fox", generator=torch.Generator().manual_seed(0), **kw
    ).frames
    ref = WanPipeline(**parts)("a red fox", generator=torch.Generator().manual_seed(0), **kw).frames
    assert ours.shape == (1, 5, 3, 16, 16) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
