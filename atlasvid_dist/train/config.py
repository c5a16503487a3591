"""Training settings (one frozen dataclass, read from YAML by config.files: unknown keys and wrong types refused)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config.method import AtlasConfig
from ..errors import ConfigError, check

BAD_DATA_POLICIES = ("skip", "stop")
LR_SCHEDULES = ("constant", "cosine")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
TRAIN_MODES = ("atlas", "ultragen")
TINY_DEFAULTS = dict(width=128, height=128, frames=9, temporal_scale=2, window=(3, 4, 4))
"""Geometry used with ``model: tiny`` where the YAML and the command line set none: the tiny model's natural size
(short clips of 9 frames suffice) instead of Wan's 1280x704 x 81 frames."""


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA training run (stage 1: proxy; stage 2: detail reading the clean proxy through windows)."""

    stage: int = 1
    """1 trains the proxy (low fps, temporally scaled RoPE); 2 trains the detail branch (see ``mode``)."""
    mode: str = "atlas"
    """Stage-2 attention: 'atlas' (windows reading the clean proxy) or 'ultragen' (windows + compressed global
    branch, AtlasConfig's ultragen_pool / ultragen_weight defaults; no proxy). Stage 1 is 'atlas' only."""
    data: str = ""
    """Folder with the videos and captions.jsonl."""
    model: str = "tiny"
    """'tiny' or a diffusers-format Wan2.1 folder."""
    output: str = "train_out"
    """Folder for checkpoints, the log and adapter.safetensors."""
    width: int = 1280
    """Detail training width in pixels (stage 1 trains at width / spatial_scale)."""
    height: int = 704
    """Detail training height in pixels (720P cropped to 704 so the token rows divide by spatial_scale)."""
    frames: int = 81
    """Detail clip length in frames (4k+1)."""
    fps: float = 16.0
    """Detail frame rate; source videos are sampled at this rate (stage 1 at fps / temporal_scale)."""
    temporal_scale: int = 4
    """r_t: proxy fps = fps / r_t."""
    spatial_scale: int = 2
    """Proxy size = detail size / spatial_scale (used when spatial_scales is empty)."""
    spatial_scales: tuple = ()
    """Stage 2: spatial scales drawn per step from the seeded generator (e.g. [3, 6]: what 4K and 8K generation
    use); each, with the window, must tile the detail token grid. Empty: spatial_scale only."""
    window: tuple = (3, 11, 16)
    """Stage-2 window (t, h, w) in tokens; must tile the detail token grid (1280x704 x 81: 21 x 44 x 80) unless
    pad_windows."""
    pad_windows: bool = False
    """Stage 2: pad (mask) windows that do not tile the detail token grid, as generate does for such a grid."""
    bad_data: str = "skip"
    """Bad video/caption: 'skip' (counted in the log) or 'stop' (raise naming the file)."""
    text_len: int = 512
    """Text tokens per caption (Wan: 512)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale = alpha / r)."""
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")
    """Module names that get LoRA (attention projections)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule: str = "constant"
    """'constant' or 'cosine' (to 0 at max_steps) after warm-up."""
    max_steps: int = 1000
    """Optimizer steps in total."""
    batch: int = 1
    """Clips per rank per micro step (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro steps per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (DeepSpeed gradient_clipping); 0 disables."""
    seed: int = 0
    """Seed of the LoRA init, clip sampling and noise (per step and rank, so resume is exact)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Log loss / lr / tokens per second every N steps."""
    timestep_sampling: str = "uniform"
    """Base distribution of the flow-matching time s in (0, 1): 'uniform' or 'logit_normal' (sigmoid of N(0, 1))."""
    timestep_shift: float = 1.0
    """Wan's shift of the noise level: sigma = shift * s / (1 + (shift - 1) * s); 1 = none, 5 = Wan's 720P value."""
    tensorboard: bool = False
    """Also write loss / lr / tokens per second to OUTPUT/tensorboard (needs the tensorboard package)."""
    lora_stage1: str = ""
    """Stage 2: the frozen stage-1 adapter (safetensors) whose proxy keys/values the detail reads, as at
    generation; 'none' trains without one (proxy from the base weights). Required by stage-2 training."""

    def __post_init__(self) -> None:
        _check_types(self)
        check(self.stage in (1, 2), "stage", self.stage, "must be 1 or 2")
        check(self.mode in TRAIN_MODES, "mode", self.mode, f"must be one of {TRAIN_MODES}")
        check(
            self.stage == 2 or self.mode == "atlas",
            "mode",
            self.mode,
            "'ultragen' has no proxy stage: it trains stage 2 only",
        )
        check(self.frames >= 1 and (self.frames - 1) % 4 == 0, "frames", self.frames, "must be 4k+1")
        for name in ("width", "height"):
            v = getattr(self, name)
            check(
                v > 0 and v % (16 * self.spatial_scale) == 0,
                name,
                v,
                f"must be a positive multiple of 16 * spatial_scale = {16 * self.spatial_scale}",
            )
        self._check_scales()
        for name in (
            "temporal_scale",
            "spatial_scale",
            "text_len",
            "lora_rank",
            "max_steps",
            "log_every",
            "batch",
            "grad_accum",
        ):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        for name in ("warmup_steps", "save_every", "grad_clip", "weight_decay"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        check(
            self.fps > 0 and self.lr > 0 and self.lora_alpha > 0,
            "fps/lr/lora_alpha",
            (self.fps, self.lr, self.lora_alpha),
            "must all be > 0",
        )
        check(self.bad_data in BAD_DATA_POLICIES, "bad_data", self.bad_data, f"must be one of {BAD_DATA_POLICIES}")
        check(
            self.timestep_sampling in TIMESTEP_SAMPLING,
            "timestep_sampling",
            self.timestep_sampling,
            f"must be one of {TIMESTEP_SAMPLING}",
        )
        check(self.timestep_shift > 0, "timestep_shift", self.timestep_shift, "must be > 0")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"must be one of {LR_SCHEDULES}")
        check(
            len(self.window) == 3 and all(isinstance(v, int) and v >= 1 for v in self.window),
            "window",
            self.window,
            "must be three integers >= 1 (t, h, w)",
        )
        if self.stage == 2:
            self._check_window()
        check(
            len(self.lora_targets) >= 1 and all(isinstance(v, str) and v for v in self.lora_targets),
            "lora_targets",
            self.lora_targets,
            "must be a non-empty list of module names",
        )

    @property
    def scales(self) -> tuple[int, ...]:
        """The spatial scales a run trains at: spatial_scales, or (spatial_scale,)."""
        return tuple(self.spatial_scales) or (self.spatial_scale,)

    def _check_scales(self) -> None:
        check(
            all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.spatial_scales),
            "spatial_scales",
            self.spatial_scales,
            "must be a list of integers >= 1",
        )
        check(
            not self.spatial_scales or self.stage == 2,
            "spatial_scales",
            self.spatial_scales,
            "is a stage-2 setting (stage 1 trains the proxy at one size: width / spatial_scale)",
        )
        check(
            self.lora_stage1 == "" or self.stage == 2,
            "lora_stage1",
            self.lora_stage1,
            "is a stage-2 setting (the frozen proxy adapter)",
        )
        for s in self.spatial_scales:
            check(
                self.width % (16 * s) == 0 and self.height % (16 * s) == 0,
                "spatial_scales",
                list(self.spatial_scales),
                f"{s} needs width and height multiples of 16 * {s} = {16 * s} (got {self.width}x{self.height})",
            )

    def method_config(self, spatial_scale: int | None = None) -> AtlasConfig:
        """The AtlasConfig the model trains with: ``mode``, the window and the proxy scales."""
        return AtlasConfig(
            mode=self.mode,
            window=tuple(self.window),
            temporal_scale=self.temporal_scale,
            spatial_scale=self.spatial_scale if spatial_scale is None else spatial_scale,
            pad_windows=self.pad_windows,
        )

    def _check_window(self) -> None:
        """The window and every spatial scale tile the detail token grid (ConfigError naming the field)."""
        from ..errors import ConfigError
        from ..geometry.grid import Grid, ProxyGeometry
        from ..geometry.windows import WindowSpec

        grid = Grid((self.frames - 1) // 4 + 1, self.height // 16, self.width // 16)
        WindowSpec(grid, tuple(self.window), (0, 0, 0), pad=self.pad_windows)
        for s in self.scales:
            try:
                ProxyGeometry(grid, self.temporal_scale, s)
            except ConfigError as e:
                raise ConfigError(
                    "spatial_scales",
                    list(self.scales),
                    f"{s} does not tile the detail token grid {grid.t}x{grid.h}x{grid.w} ({e})",
                ) from None


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "tuple": (tuple, list)}


def _check_types(cfg: TrainConfig) -> None:
    """Each field holds its declared type (YAML gives strings for quoted numbers, so this is checked here)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        want = _TYPES[f.type]
        bad_bool = isinstance(value, bool) and f.type != "bool"
        if bad_bool or not isinstance(value, want):
            raise ConfigError(f.name, value, f"must be of type {f.type}")
        if isinstance(value, list):
            object.__setattr__(cfg, f.name, tuple(value))
