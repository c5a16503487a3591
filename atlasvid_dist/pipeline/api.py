"""A diffusers-style entry point for library users: load once, call with a prompt, get frames.

``AtlasVidPipeline.from_pretrained("tiny" | folder | "org/name", lora_stage1=..., lora_stage2=...)`` loads the model
(a Hugging Face id is read from the local cache only) and the adapters once; each call builds a
:class:`~atlasvid_dist.config.generate.GenerateConfig` from the same option names as ``atlasvid-dist generate`` and
runs the project's one-process :class:`~atlasvid_dist.pipeline.generate.TwoStageGenerator` on the loaded parts.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError


@dataclass
class AtlasVidOutput:
    """What a call returns."""

    frames: np.ndarray
    """The video, uint8 (frames, height, width, 3) RGB."""
    path: str | None
    """The mp4 written (``output_path``), or None."""
    result: object
    """The generator's RunResult (sizes, token counts, seconds per stage)."""


class AtlasVidPipeline:
    """Two-stage AtlasVid text-to-video on Wan2.1, called like a diffusers pipeline."""

    def __init__(
        self,
        components,
        lora_stage1: str | None = None,
        lora_stage2: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        model: str = "tiny",
    ):
        self.components, self.model = components, model
        self.lora_stage1, self.lora_stage2 = lora_stage1, lora_stage2
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "tiny",
        *,
        lora_stage1: str | os.PathLike | None = None,
        lora_stage2: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: str = "auto",
    ) -> "AtlasVidPipeline":
        """Load ``"tiny"``, a diffusers-format Wan2.1 T2V folder or a cached Hugging Face id, and the adapters
        (diffusers-format .safetensors or peft ``save_pretrained`` folders); every failure is a ModelLoadError."""
        from ..config.generate import GenerateConfig
        from ..config.method import AtlasConfig
        from ..models import lora
        from ..models.loading import load_components
        from .generate import resolve_dtype

        probe = GenerateConfig(
            prompt="-",
            model=str(model),
            device=device,
            dtype=dtype,  # checks device, dtype
            method=AtlasConfig(mode="full"),
        )
        parts = load_components(str(model), dtype=resolve_dtype(probe), device=device)
        for name, path in (("stage1", lora_stage1), ("stage2", lora_stage2)):
            if path is not None:
                lora.load_lora(parts.transformer, path, name)
        return cls(parts, _opt_str(lora_stage1), _opt_str(lora_stage2), device, dtype, str(model))

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 30,
        proxy_steps: int | None = None,
        guidance_scale: float = 5.0,
        seed: int = 0,
        fps: int = 16,
        output_path: str | None = None,
        crf: int = 18,
        **options,
    ) -> AtlasVidOutput:
        """Generate one video. ``options`` are further ``generate`` options by name (``attention``, ``window``,
        ``temporal_scale``, ``spatial_scale``, ``flow_shift``, ...); ``negative_prompt=None`` means the default
        (Wan's own). Returns the frames (uint8) and, with ``output_path`` (.mp4), writes the video there too."""
        from .video_io import read_mp4

        with tempfile.TemporaryDirectory(prefix="atlasvid-pipe-") as tmp:
            lossless = output_path is None
            out = str(Path(tmp) / "video.mp4") if lossless else str(output_path)
            cfg = self._config(
                prompt,
                negative_prompt,
                f"{width}x{height}",
                num_frames,
                fps,
                num_inference_steps,
                proxy_steps,
                guidance_scale,
                seed,
                out,
                0 if lossless else crf,
                options,
            )
            result = self._generator(cfg).run()
            frames = read_mp4(out)
        return AtlasVidOutput(frames=frames, path=None if lossless else out, result=result)

    def _config(
        self, prompt, negative_prompt, res, frames, fps, steps, proxy_steps, guidance, seed, out, crf, options: dict
    ):
        """GenerateConfig from the call's arguments, through the CLI's option table (same names, same defaults)."""
        from ..cli.generate import DEFAULTS, build_config

        fixed = {"model", "lora_stage1", "lora_stage2", "device", "dtype", "out", "res", "frames", "prompt"}
        clash = sorted(fixed & set(options))
        if clash:
            raise ConfigError(clash[0], options[clash[0]], "is set by from_pretrained or a named argument of the call")
        values = {
            **DEFAULTS,
            **options,
            "prompt": prompt,
            "model": self.model,
            "lora_stage1": self.lora_stage1,
            "lora_stage2": self.lora_stage2,
            "device": self.device,
            "dtype": self.dtype,
            "res": res,
            "frames": frames,
            "fps": fps,
            "steps": steps,
            "proxy_steps": proxy_steps or steps,
            "guidance": guidance,
            "seed": seed,
            "out": out,
            "crf": crf,
        }
        if negative_prompt is not None:
            values["negative_prompt"] = negative_prompt
        return build_config(values)

    def _generator(self, cfg):
        from .generate import TwoStageGenerator

        return TwoStageGenerator(cfg, components=self.components, progress=False)


def _opt_str(path) -> str | None:
    return None if path is None else str(path)
