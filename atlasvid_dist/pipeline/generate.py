"""Two-stage generation on one process: text -> stage 1 proxy -> stage 2 detail -> tiled decode -> mp4.

Each stage checks what it receives and what it hands on. With a run folder every denoising step commits a
checkpoint (latents, scheduler state, RNG state, proxy, config) so a run can resume after any step and give the
same result as an uninterrupted one. The stages themselves (``pipeline/stages.py``) are the ones the distributed
runtime's ranks run, each on its own share of the tokens; here they run on the whole grid.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config.generate import GenerateConfig
from ..errors import ConfigError, InputError, ModelLoadError, RunFailure
from .checkpoint import StepCheckpointer, step_key
from .host_memory import fix_mmap_threshold
from .stages import DetailStage, ProxyStage, SavedStep, StageState, proxy_caches
from .text import TextEmbeddings, encode_prompts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGE1, STAGE2 = ProxyStage.name, DetailStage.name
STAGES = (STAGE1, STAGE2)
"""The stages in run order (a checkpoint's step key counts by this index)."""


@dataclass
class RunResult:
    """What a run did: the summary the CLI prints."""

    out: str
    frames: int
    width: int
    height: int
    fps: float
    detail_tokens: int
    proxy_tokens: int
    steps: int
    proxy_steps: int
    seconds: dict = field(default_factory=dict)
    out_bytes: int = 0
    resumed_from: str | None = None
    proxy_out: str | None = None
    """--save-proxy's video (None: not written)."""
    latents_out: str | None = None
    """--save-latents' file (None: not written)."""
    seed: int = 0
    model: str = "tiny"
    """--model as given: 'tiny' or a folder."""
    step_seconds: dict = field(default_factory=dict)
    """Median seconds of one denoising step, by stage (checkpoint commit included)."""
    peak_memory: list = field(default_factory=list)
    """Per rank (one entry on one process): ``report.peak_memory`` of the process that ran it."""
    wall_seconds: float | None = None
    """The whole run as the caller timed it (set by the CLI)."""
    detail_forwards: dict = field(default_factory=dict)
    """Detail-stage forwards: ``total`` (CFG truncation counted) and ``reused`` (skipped by the first-block
    cache after its first block); empty when the run did not reach the detail stage here (a driver's ranks)."""

    @classmethod
    def for_config(cls, cfg: GenerateConfig, seconds: dict, out_bytes: int, **extra) -> "RunResult":
        """The result of a run of ``cfg`` (sizes, paths, seed and model from the configuration)."""
        return cls(
            cfg.out,
            cfg.video.frames,
            cfg.video.width,
            cfg.video.height,
            cfg.video.fps,
            cfg.detail_grid.size,
            cfg.proxy.grid.size if cfg.uses_proxy else 0,
            cfg.steps,
            cfg.proxy_steps if cfg.uses_proxy else 0,
            dict(seconds),
            out_bytes,
            proxy_out=cfg.save_proxy if cfg.uses_proxy else None,
            latents_out=cfg.save_latents,
            seed=cfg.seed,
            model=cfg.model,
            **extra,
        )

    def to_dict(self) -> dict:
        """The machine-readable summary (``generate --json``): paths, geometry, times, memory, model, seed."""
        from .report import model_info, path_or_none

        return {
            "paths": {
                "video": path_or_none(self.out),
                "proxy": path_or_none(self.proxy_out),
                "latents": path_or_none(self.latents_out),
            },
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": self.fps,
            "out_bytes": self.out_bytes,
            "steps": self.steps,
            "proxy_steps": self.proxy_steps,
            "detail_tokens": self.detail_tokens,
            "proxy_tokens": self.proxy_tokens,
            "seconds": dict(self.seconds),
            "median_step_seconds": dict(self.step_seconds),
            "wall_seconds": self.wall_seconds,
            "peak_memory": list(self.peak_memory),
            "model": model_info(self.model),
            "seed": self.seed,
            "resumed_from": self.resumed_from,
            "detail_forwards": dict(self.detail_forwards),
            "workers": 1,
            "bytes_sent": None,
        }

    def summary(self) -> str:
        t = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        resumed = f"; resumed from {self.resumed_from}" if self.resumed_from else ""
        f = self.detail_forwards
        if f.get("reused"):
            resumed += f"; {f['reused']} of {f['total']} detail forwards reused the first-block cache"
        return (
            f"{self.out}: {self.width}x{self.height}, {self.frames} frames at {self.fps:g} fps, "
            f"{self.out_bytes / 1e6:.2f} MB | detail {self.detail_tokens:,} tokens x {self.steps} steps, "
            f"proxy {self.proxy_tokens:,} tokens x {self.proxy_steps} steps | {t}{resumed}"
        )


def resolve_dtype(cfg: GenerateConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if cfg.device == "cuda" else torch.float32
    return DTYPES[cfg.dtype]


class RunInterrupted(RuntimeError):
    """Raised by the ``interrupt_at`` hook after a committed step (tests use it to simulate a crash)."""


class TwoStageGenerator:
    """Runs one :class:`GenerateConfig`. ``components`` (a loading.WanComponents) may be given to skip loading.

    ``interrupt_at=(stage, step)`` stops the run right after that step's checkpoint is committed;
    ``on_commit(stage, step)``, when set, is called after every committed step (runtimes report progress with it).
    """

    interrupt_at: tuple[str, int] | None = None
    on_commit: Callable[[str, int], None] | None = None

    def __init__(self, cfg: GenerateConfig, components=None, progress: bool = True, local_device: bool = True):
        """``local_device=False``: this process does not run the model (a Ray cluster's driver, whose GPUs are on
        other nodes), so it neither needs CUDA itself nor checks for it; the workers check their own."""
        self.cfg, self.progress = cfg, progress
        self.device, self.dtype = torch.device(cfg.device), resolve_dtype(cfg)
        fix_mmap_threshold(cfg.host_mmap_threshold)  # this process's allocator, before the run allocates
        if local_device and cfg.device == "cuda" and not torch.cuda.is_available():
            raise InputError("device: 'cuda' requested but no CUDA device is available")
        self.components = components
        self.seconds: dict[str, float] = {}
        self.step_times: dict[str, list[float]] = {}
        """Seconds of every denoising step run, by stage."""
        self.detail_forwards: dict[str, int] = {}
        """The detail stage's forwards (see RunResult.detail_forwards), set when it ends."""
        self.decode_order = "sequential" if cfg.decode_order == "sequential" else "together"
        """How the decode runs: the config's order, 'auto' resolved by :meth:`preflight` (together until then)."""
        self.gpu_name: str | None = None
        """The GPUs' name for the 'auto' device profile when they are not this process's (a cluster's driver)."""

    def say(self, line: str) -> None:
        """One progress line on stderr (nothing with progress off, e.g. --quiet)."""
        if self.progress:
            print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------ run
    def run(self, resume: bool = False, overwrite: bool = False) -> RunResult:
        """Generate; ``resume`` continues the run folder's run, ``overwrite`` clears a previous run's folder first.
        Everything is checked (plan, outputs, run folder) before a model loads."""
        from .outputs import check_outputs

        cfg = self.cfg
        self.preflight()
        check_outputs(cfg)
        ckpt = self.checkpointer(resume, overwrite=overwrite)
        t0 = time.perf_counter()
        comp = self.load()
        self.seconds["load"] = time.perf_counter() - t0
        self.say(f"loading model {cfg.model} ... {self.seconds['load']:.1f} s")
        text = self.encode(comp)
        self.say(f"encoding prompt ... {self.seconds['text']:.1f} s")
        saved = self.resume_state(ckpt) if resume else None
        proxy = None
        if cfg.uses_proxy:
            proxy = self.stage1(comp, text, ckpt, saved)
        latents = self.stage2(comp, text, proxy, ckpt, saved)
        if cfg.save_latents:
            _save_latents(cfg.save_latents, latents, cfg, proxy)
        out_bytes = self.write_videos(comp, latents, proxy)
        from .report import median, peak_memory

        return RunResult.for_config(
            cfg,
            self.seconds,
            out_bytes,
            resumed_from=f"{saved.stage} step {saved.step}" if saved else None,
            step_seconds={k: median(v) for k, v in self.step_times.items()},
            peak_memory=[{"rank": 0, **peak_memory(cfg.device)}],
            detail_forwards=self.detail_forwards,
        )

    # ------------------------------------------------------------------------------------------------ stages
    def preflight(self, workers: int = 1, plan=None):
        """The cost model's fit check for ``workers`` ranks, before any model loads: PlanError (exit 2) with the
        numbers if the run won't fit, or if ``plan`` (a ParallelPlan; default: ``workers`` ranks, stage 1 on one)
        cannot be carried by the model's heads or the windows. The distributed driver calls it with its plan."""
        from ..config.parallel import ParallelPlan
        from ..cost.model import RunSettings, estimate

        cfg = self.cfg
        spec = self.model_spec()
        profile = cfg.device_profile
        if profile == "auto":
            profile = "cpu" if cfg.device == "cpu" else ("h200" if "H200" in self._gpu_name() else "h100")
        if plan is None:
            plan = ParallelPlan(workers=workers, device=cfg.device, gpus=workers if cfg.device == "cuda" else 0)
        tile, overlap, batch = cfg.decode_settings
        run = RunSettings(
            dtype=cfg.dtype,
            steps=cfg.steps,
            proxy_steps=cfg.proxy_steps,
            guidance=cfg.guidance,
            detail_init=cfg.detail_init,
            init_strength=cfg.init_strength,
            detail_cfg_until=cfg.detail_cfg_until,
            detail_reuse=cfg.detail_reuse,
            ffn_chunk_tokens=cfg.ffn_chunk,
            decode_order=cfg.decode_order,
            decode_tile=tile,
            decode_overlap=overlap,
            decode_batch=batch,
        )
        report = estimate(cfg.video, spec, cfg.method, plan, run, profile, suggest=False)
        report.raise_if_unfit()
        self.decode_order = report.decode_order  # 'auto' resolved against this run's memory
        self.warn_adapter_geometry()
        return report

    def _gpu_name(self) -> str:
        """The GPUs' name: :attr:`gpu_name` when set, else this process's CUDA device's ('' without one)."""
        if self.gpu_name is not None:
            return self.gpu_name
        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""

    def warn_adapter_geometry(self) -> list[str]:
        """A line on stderr for each adapter trained at another geometry than this run's (not an error; a file
        that cannot be read is reported when it loads)."""
        from .adapter_geometry import run_geometry, warn_adapter_geometry

        cfg = self.cfg
        run = run_geometry(cfg.method, cfg.video.width, cfg.video.height, cfg.video.frames)
        return warn_adapter_geometry({1: cfg.lora_stage1, 2: cfg.lora_stage2}, run, strict=False)

    def model_spec(self):
        """The model's shapes (ModelSpec) without loading weights: the preset, or the folder's configs."""
        return self.model_spec_of(self.cfg.model)

    @staticmethod
    def model_spec_of(model: str):
        """``model``'s shapes (ModelSpec): the tiny preset, or the folder's configs (nothing loads)."""
        from ..config.model import model_preset

        if model == "tiny":
            return model_preset("tiny")
        from ..models.loading import read_model_spec

        return read_model_spec(model)

    def proxy_only(self, path: str) -> None:
        """Run stage 1 alone and write the proxy video to ``path`` (its own size and fps): the layout every detail
        window reads, at a small fraction of the whole job's cost (an evaluation of the proxy by itself)."""
        if not self.cfg.uses_proxy:
            raise ConfigError("method.mode", self.cfg.method.mode, "makes no proxy")
        comp = self.load()
        proxy = self.stage1(comp, self.encode(comp), None, None)
        self.decode(comp, proxy, path, self.cfg.video.fps / self.cfg.method.temporal_scale, None, "decode proxy")

    def load(self):
        if self.components is None:
            from ..models.loading import load_components

            self.components = load_components(
                self.cfg.model, dtype=self.dtype, device=self.cfg.device, offload_encoders=self.cfg.offload_encoders
            )
        comp = self.components
        _check_channels(comp)
        self._load_adapters(comp.transformer)
        return comp

    def _load_adapters(self, transformer) -> None:
        from ..models import lora

        for name, path in (("stage1", self.cfg.lora_stage1), ("stage2", self.cfg.lora_stage2)):
            if path and name not in (getattr(transformer, "peft_config", None) or {}):
                lora.load_lora(transformer, path, name)

    def encode(self, comp) -> TextEmbeddings:
        from ..models.loading import on_device

        t0 = time.perf_counter()
        cfg = self.cfg
        text_len = cfg.text_len or min(512, int(comp.tokenizer.model_max_length))  # Wan: 512
        with on_device(comp.text_encoder, self.device, cfg.offload_encoders) as encoder:
            text = encode_prompts(
                comp.tokenizer,
                encoder,
                cfg.prompt,
                cfg.negative_prompt,
                max_length=text_len,
                use_cfg=cfg.guidance > 1.0,
                device=self.device,
                dtype=self.dtype,
            )
        text.check(comp.transformer.config.text_dim)
        self.seconds["text"] = time.perf_counter() - t0
        return text

    def stage1(self, comp, text: TextEmbeddings, ckpt, saved: SavedStep | None) -> torch.Tensor:
        """The proxy: full attention at the proxy size with temporally scaled RoPE, its own steps and shift."""
        if saved and saved.stage == STAGE2:
            return saved.tensors["proxy"].to(self.device, self.dtype)
        t0 = time.perf_counter()
        stage = ProxyStage(self.cfg, comp, text, self.device, self.dtype)
        latents = self._run_stage(stage, ckpt, saved, None)
        _check_finite("proxy latents", latents)
        self.seconds["proxy"] = time.perf_counter() - t0
        return latents

    def stage2(self, comp, text: TextEmbeddings, proxy, ckpt, saved: SavedStep | None) -> torch.Tensor:
        """The detail latent, denoised with windows + the cached clean proxy (or full attention in mode 'full')."""
        t0 = time.perf_counter()
        stage = DetailStage(self.cfg, comp, text, proxy, self.device, self.dtype)
        latents = self._run_stage(stage, ckpt, saved, proxy)
        _check_finite("detail latents", latents)
        self.seconds["detail"] = time.perf_counter() - t0
        return latents

    def proxy_caches(self, model, proxy: torch.Tensor, text: TextEmbeddings) -> dict:
        """:func:`stages.proxy_caches` of this run's config."""
        return proxy_caches(self.cfg, model, proxy, text)

    def write_videos(self, comp, latents, proxy) -> int:
        """The video and (with --save-proxy) the proxy video, put in place together: when either fails, neither
        is at its path. Returns the video's size in bytes."""
        from .outputs import PendingOutputs

        cfg = self.cfg
        with PendingOutputs() as pending:
            out_bytes = self.decode(
                comp, latents, cfg.out, cfg.video.fps, (cfg.video.height, cfg.video.width), pending=pending
            )
            if cfg.save_proxy and proxy is not None:
                self.decode(
                    comp,
                    proxy,
                    cfg.save_proxy,
                    cfg.video.fps / cfg.method.temporal_scale,
                    None,
                    "decode proxy",
                    pending=pending,
                )
        return out_bytes

    def decode(self, comp, latents, path: str, fps: float, out_hw, label: str = "decode", pending=None) -> int:
        """Tiled, streaming VAE decode into an mp4 written under a temporary name (renamed at once, or with the
        other outputs by ``pending``, an outputs.PendingOutputs); returns the file size."""
        from ..models.loading import on_device
        from .decode import decode_stream
        from .video_io import Mp4Writer

        t0 = time.perf_counter()
        frames = (latents.shape[2] - 1) * 4 + 1
        h, w = out_hw if out_hw else (latents.shape[3] * 8, latents.shape[4] * 8)
        bar = self.bar(frames, label, "frame")
        with Mp4Writer(path, fps=fps, width=w, height=h, pending=pending, crf=self.cfg.crf) as writer:
            with torch.no_grad(), on_device(comp.vae, self.device, self.cfg.offload_encoders) as vae:
                for chunk in decode_stream(vae, latents, self.decode_tiling(), out_hw=(h, w)):
                    writer.write(chunk)
                    bar.update(len(chunk))
        bar.close()
        self.seconds[label] = time.perf_counter() - t0
        return writer.written.stat().st_size

    def decode_tiling(self):
        """The decode's tiling from the config (``GenerateConfig.decode_settings``) and the resolved order."""
        from .decode import DecodeTiling

        tile, overlap, batch = self.cfg.decode_settings
        return DecodeTiling(tile=tile, overlap=overlap, batch=batch, sequential=self.decode_order == "sequential")

    # ------------------------------------------------------------------------------------------------ helpers
    def _run_stage(self, stage, ckpt, saved: SavedStep | None, proxy) -> torch.Tensor:
        """``stage`` on the whole grid, from ``saved`` when it is this stage's; every step committed to ``ckpt``
        (with ``proxy``), timed, reported to :attr:`on_commit` and checked against :attr:`interrupt_at`."""
        layout = stage.whole_grid()
        state = stage.start(layout)
        if saved and saved.stage == stage.name:
            state.restore(saved, self.device, self.dtype)
        bar = self.bar(stage.sampler().steps, f"{stage.name} stage", "step", initial=state.step)
        times, last = self.step_times.setdefault(stage.name, []), [time.perf_counter()]

        def on_step(s: StageState):
            bar.update(1)
            if ckpt is not None:
                self._commit(ckpt, stage.name, s, proxy)
            if self.on_commit is not None:
                self.on_commit(stage.name, s.step)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            if self.interrupt_at == (stage.name, s.step):
                raise RunInterrupted(f"interrupted after {stage.name} step {s.step}")

        latents = stage.denoise(state, layout, on_step)
        bar.close()
        if stage.name == STAGE2:
            self.detail_forwards = stage.forwards(state)
        return latents

    def bar(self, total, desc, unit, initial=0):
        """A tqdm bar on a terminal, plain lines at every 10 % elsewhere (``progress.progress_bar``)."""
        from .progress import progress_bar

        return progress_bar(total, desc, unit, initial=initial, enabled=self.progress)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def checkpointer(
        self, resume: bool, workers: int | None = None, overwrite: bool = False, sharding: dict | None = None
    ):
        """The run folder's checkpointer (None without --run-dir). ``workers``: a distributed run, whose ranks keep
        their own checkpoints in subfolders; the folder's manifest (``run_folder.py``) records its run id, config
        checksum and worker count, and a folder is resumed only by the kind of run that wrote it with the same
        configuration (and, distributed, the same ``sharding`` of windows over ranks). A fresh run refuses a folder
        holding another run unless ``overwrite`` (it is cleared)."""
        from .run_folder import open_run, start_run

        if not self.cfg.run_dir:
            if resume:
                raise InputError("resume: needs a run folder (--resume DIR)")
            if overwrite:
                raise ConfigError("overwrite_run_dir", True, "needs --run-dir (there is no run folder to clear)")
            return None
        run, config = Path(self.cfg.run_dir), self.cfg.to_dict()
        step_key(len(STAGES) - 1, max(self.cfg.steps, self.cfg.proxy_steps))  # ConfigError now, not at that step
        if resume and overwrite:
            raise ConfigError("overwrite_run_dir", True, "--resume continues the folder's run; it cannot clear it")
        if resume:
            manifest = open_run(run, config, workers, sharding)
        else:
            manifest = start_run(run, config, workers, overwrite, sharding)
        return StepCheckpointer(run, run_id=manifest["run_id"], config_sha256=manifest["config_sha256"])

    def _commit(self, ckpt, stage: str, state: StageState, proxy) -> None:
        tensors, meta = state.checkpoint()
        if proxy is not None:
            tensors["proxy"] = proxy.detach().cpu().clone()
        ckpt.commit(step_key(STAGES.index(stage), state.step), tensors, {"stage": stage, **meta})

    def resume_state(self, ckpt) -> SavedStep | None:
        """The newest committed step that loads (a damaged newer step is skipped, saying which and why)."""

        def skipped(step, reason):
            print(f"resume: skipping {ckpt.step_dir(step)} ({reason}); trying an older step", file=sys.stderr)

        found = ckpt.newest_loadable(on_skip=skipped)
        if found is None:
            return None
        _, tensors, meta = found
        return SavedStep(meta["step"], tensors, meta)


def _check_channels(comp) -> None:
    c, z = comp.transformer.config.in_channels, comp.vae.config.z_dim
    if c != z:
        raise ModelLoadError(f"transformer in_channels={c} does not match the VAE z_dim={z}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise RunFailure(f"{name}: contain NaN or inf")


def _save_latents(path: str, latents: torch.Tensor, cfg: GenerateConfig, proxy: torch.Tensor | None = None) -> None:
    """The final detail latents (key "latents") and, when the method has one, the proxy latents ("proxy")."""
    from .outputs import partial_path, save_safetensors

    tmp = partial_path(path)
    try:
        tensors = {"latents": latents, **({"proxy": proxy} if proxy is not None else {})}
        save_safetensors(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"config": json.dumps(cfg.to_dict())},
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
