"""GenerateConfig: everything one `generate` run needs, validated (geometry included) before any model loads."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from ..errors import check
from ..geometry.grid import Grid, ProxyGeometry, latent_grid, token_grid
from ..geometry.windows import WindowSpec
from .method import AtlasConfig
from .video import DEFAULT_RES, VideoSpec

DetailInit = Literal["noise", "proxy"]
DecodeOrder = Literal["auto", "together", "sequential"]
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
DETAIL_INITS, DEVICES, DTYPES, DECODE_ORDERS = (get_args(t) for t in (DetailInit, Device, Dtype, DecodeOrder))
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Wan2.1's own default negative prompt (``sample_neg_prompt`` of its shared config), the default here too."""
#: Longest prompt (characters) accepted. The text encoder reads at most 512 tokens (Wan2.1's UMT5: ~4 characters
#: a token in English); a longer text is cut there anyway, and tokenizing megabytes of it before the cut cost
#: tens of GB. Refused, not silently cut.
MAX_PROMPT_CHARS = 10_000
#: Most text tokens per prompt (Wan2.1's UMT5 is trained with 512).
MAX_TEXT_LEN = 512
#: Most denoising steps per stage (Wan uses 30-50; more is a typo, not a setting).
MAX_STEPS = 10_000
#: Seeds are 64-bit (torch.Generator.manual_seed).
MAX_SEED = 2**63 - 1
#: Decode tile side in latent cells when decode_tile is 0 (auto).
DEFAULT_DECODE_TILE = 32
#: glibc's largest mmap threshold on 64-bit hosts (mallopt refuses more).
MAX_MMAP_THRESHOLD = 32 * 2**20


def decode_settings(tile: int, overlap: int, batch: int, device: str) -> tuple[int, int, int]:
    """(tile, overlap, tiles per call) of a decode: tile 0 = DEFAULT_DECODE_TILE latent cells, the overlap at most
    half a tile, tiles per call 0 = 8 on CPU (conv3d runs several times faster per tile in a batch), 1 on CUDA.
    What generate decodes with, what its pre-flight prices and what `plan` prices."""
    tile = tile or DEFAULT_DECODE_TILE
    return tile, min(overlap, tile // 2), batch or (8 if device == "cpu" else 1)


@dataclass(frozen=True)
class GenerateConfig:
    """One two-stage generation run."""

    prompt: str
    """Text prompt."""
    video: VideoSpec = field(default_factory=lambda: VideoSpec.from_res(DEFAULT_RES))
    """Output video (size, frames, fps)."""
    method: AtlasConfig = field(default_factory=AtlasConfig)
    """Attention method for stage 2 (stage 1 always uses full attention at the proxy size)."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Negative prompt for classifier-free guidance (default: Wan2.1's own; "" for none)."""
    model: str = "tiny"
    """'tiny' (built in, random weights: its video is noise; for trying the pipeline) or a local diffusers-format
    Wan2.1 T2V folder."""
    lora_stage1: str | None = None
    """LoRA adapter (safetensors) active for the proxy stage (and the cached proxy path)."""
    lora_stage2: str | None = None
    """LoRA adapter (safetensors) active for the detail stage."""
    steps: int = 30
    """Detail-stage denoising steps."""
    proxy_steps: int = 30
    """Proxy-stage denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale (<= 1 disables the negative pass)."""
    flow_shift: float = 5.0
    """Flow-matching shift of the detail stage."""
    proxy_flow_shift: float = 5.0
    """Flow-matching shift of the proxy stage."""
    seed: int = 0
    """Random seed (noise of both stages)."""
    detail_init: DetailInit = "noise"
    """'noise', or 'proxy': start from the upsampled proxy noised to ``init_strength``."""
    init_strength: float = 0.7
    """With detail_init='proxy': fraction of the detail steps that run (1.0 = from pure noise)."""
    detail_cfg_until: float = 1.0
    """CFG truncation: classifier-free guidance runs in the first ``detail_cfg_until`` of the detail stage's
    schedule (a fraction of ``steps``, counted from pure noise, rounded); later steps run the prompt alone, one
    forward instead of two. 1.0 = every step; 0 = none."""
    detail_reuse: float = 0.0
    """First-block cache of the detail stage: when the first block's residual differs from the one of the last
    fully run forward (same prompt) by less than this fraction (relative L1 over all tokens), the other blocks are
    skipped and their residual from that forward is reused. 0 = off (every block runs every forward)."""
    ffn_chunk: int = 0
    """Run every block's feed-forward over chunks of this many tokens (0 = all at once): bounds its
    (tokens x ffn_dim) activations, the largest of a block; the result is the same."""
    offload_encoders: bool = False
    """Keep the text encoder and the VAE in host memory except while they work: the text encoder comes onto the
    device for the prompts' encoding only, the VAE for the decode only (Wan2.1's UMT5-XXL is ~10.6 GiB in bf16:
    off the GPU for every denoising step). No effect on a CPU device."""
    host_mmap_threshold: int = 0
    """Bytes from which each process of the run (one process, or every Ray worker) has the C library map an
    allocation on its own and unmap it when freed, fixed for the run; 0 = the library's default. glibc's default
    threshold rises (up to 32 MiB) each time a mapped block is freed, after which freed tensors stay in the
    process's heap and its peak RSS runs well above the tensors alive (the memory model's figure). 131072
    (glibc's initial value) keeps it there: at 1024x1024x33 on CPU (tiny model, one process) peak RSS 1.05 GB
    instead of 1.40 GB, 14% slower. glibc only; elsewhere ignored."""
    compile_blocks: bool = False
    """Run each transformer block's code around its attentions (norms, modulation, the feed-forward, gated
    residuals) through torch.compile: fused element-wise kernels instead of one kernel per operation. The first
    forward on every new token count compiles (seconds on the small models, minutes at scale); the result equals
    the eager one to rounding. Needs a C++ compiler on CPU."""
    device: Device = "auto"
    """'auto' (cuda when torch sees a CUDA device, else cpu; resolved when the config is built), 'cpu' or 'cuda'."""
    dtype: Dtype = "auto"
    """'auto' (bf16 on CUDA, fp32 on CPU), 'fp32', 'bf16', 'fp16'."""
    text_len: int = 0
    """Text tokens per prompt; 0 = the tokenizer's maximum, at most 512 (Wan2.1 uses 512)."""
    out: str = "out.mp4"
    """Output mp4 path (written to a temporary name, renamed when complete)."""
    save_proxy: str | None = None
    """Also write the proxy video (mp4) here."""
    crf: int = 18
    """H.264 quality of the written videos (libx264 CRF, 0-51, lower is better); 0 = lossless RGB."""
    save_latents: str | None = None
    """Also write the final detail latents (safetensors) here, before decoding."""
    run_dir: str | None = None
    """Commit a checkpoint after every denoising step here (resumable with --resume)."""
    decode_tile: int = 0
    """Spatial decode tile in latent cells (0 = auto)."""
    decode_overlap: int = 4
    """Overlap of decode tiles in latent cells."""
    decode_order: DecodeOrder = "auto"
    """'together' (every decode tile advances together: each tile's causal cache live at once), 'sequential'
    (tile group after tile group: one group's caches; the blender holds the clip's frames) or 'auto' (sequential
    only when the pre-flight finds that together does not fit and that sequential needs less: on CPU the blender's
    frames of the whole clip are in the same memory)."""
    decode_batch: int = 0
    """Equal-shaped decode tiles per VAE call (0 = auto: 8 on CPU, where conv3d runs several times faster per tile
    in a batch; 1 on CUDA)."""
    device_profile: str = "auto"
    """Cost-model device profile for the pre-flight memory check: h100|h200|cpu|FILE.yaml; auto = by device."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", resolve_device(self.device))
        self._check_texts()
        for name in ("steps", "proxy_steps"):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_STEPS,
                name,
                v,
                f"must be an integer in [1, {MAX_STEPS}]",
            )
        check(_finite(self.guidance) and self.guidance >= 0, "guidance", self.guidance, "must be a finite number >= 0")
        for name in ("flow_shift", "proxy_flow_shift"):
            v = getattr(self, name)
            check(_finite(v) and v > 0, name, v, "must be a finite number > 0")
        check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED,
            "seed",
            self.seed,
            "must be an integer in [0, 2**63 - 1]",
        )
        check(self.detail_init in DETAIL_INITS, "detail_init", self.detail_init, f"must be one of {DETAIL_INITS}")
        check(
            isinstance(self.init_strength, (int, float)) and 0 < self.init_strength <= 1,
            "init_strength",
            self.init_strength,
            "must be in (0, 1]",
        )
        check(
            _finite(self.detail_cfg_until) and 0 <= self.detail_cfg_until <= 1,
            "detail_cfg_until",
            self.detail_cfg_until,
            "must be a number in [0, 1] (1 = guidance at every detail step)",
        )
        check(
            _finite(self.detail_reuse) and 0 <= self.detail_reuse < 1,
            "detail_reuse",
            self.detail_reuse,
            "must be a number in [0, 1) (0 = off)",
        )
        check(
            isinstance(self.ffn_chunk, int) and not isinstance(self.ffn_chunk, bool) and self.ffn_chunk >= 0,
            "ffn_chunk",
            self.ffn_chunk,
            "must be an integer >= 0 (0 = all tokens at once)",
        )
        check(isinstance(self.offload_encoders, bool), "offload_encoders", self.offload_encoders, "must be true/false")
        check(
            isinstance(self.host_mmap_threshold, int)
            and not isinstance(self.host_mmap_threshold, bool)
            and 0 <= self.host_mmap_threshold <= MAX_MMAP_THRESHOLD,
            "host_mmap_threshold",
            self.host_mmap_threshold,
            f"must be an integer in [0, {MAX_MMAP_THRESHOLD}] bytes (0 = the C library's default)",
        )
        check(isinstance(self.compile_blocks, bool), "compile_blocks", self.compile_blocks, "must be true/false")
        check(self.decode_order in DECODE_ORDERS, "decode_order", self.decode_order, f"must be one of {DECODE_ORDERS}")
        check(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        check(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        check(
            isinstance(self.text_len, int)
            and not isinstance(self.text_len, bool)
            and 0 <= self.text_len <= MAX_TEXT_LEN,
            "text_len",
            self.text_len,
            f"must be an integer in [0, {MAX_TEXT_LEN}] (0 = the tokenizer's maximum)",
        )
        check(
            isinstance(self.decode_batch, int) and not isinstance(self.decode_batch, bool) and self.decode_batch >= 0,
            "decode_batch",
            self.decode_batch,
            "must be an integer >= 0 (0 = auto)",
        )
        check(
            isinstance(self.crf, int) and not isinstance(self.crf, bool) and 0 <= self.crf <= 51,
            "crf",
            self.crf,
            "must be an integer in [0, 51] (0 = lossless)",
        )
        check(
            self.method.mode != "full" or self.detail_init == "noise",
            "detail_init",
            self.detail_init,
            "'proxy' needs a proxy; mode 'full' has none",
        )
        self._check_paths()
        self._check_geometry()

    @property
    def detail_schedule(self) -> "DetailSchedule":
        """Which detail steps run, and which of them with guidance."""
        return DetailSchedule.of(self.steps, self.detail_init, self.init_strength, self.detail_cfg_until)

    @property
    def decode_settings(self) -> tuple[int, int, int]:
        """(tile, overlap, tiles per call) the decode runs with on this run's device (:func:`decode_settings`)."""
        return decode_settings(self.decode_tile, self.decode_overlap, self.decode_batch, self.device)

    def _check_texts(self) -> None:
        """Prompt: a non-empty text of at most MAX_PROMPT_CHARS; every other text/path field: a str (or None)."""
        check(isinstance(self.prompt, str), "prompt", self.prompt, "must be a text")
        check(self.prompt.strip() != "", "prompt", self.prompt, "must not be empty")
        for name in ("prompt", "negative_prompt"):
            v = getattr(self, name)
            check(isinstance(v, str), name, v, "must be a text")
            check(
                len(v) <= MAX_PROMPT_CHARS,
                name,
                f"{v[:40]}... ({len(v):,} characters)",
                f"must be at most {MAX_PROMPT_CHARS:,} characters (the text encoder reads {MAX_TEXT_LEN} tokens; "
                f"the rest would be cut)",
            )
        for name in ("model", "out", "device_profile"):
            check(isinstance(getattr(self, name), str), name, getattr(self, name), "must be a text (a name or path)")
        for name in ("lora_stage1", "lora_stage2", "save_proxy", "save_latents", "run_dir"):
            v = getattr(self, name)
            check(v is None or isinstance(v, str), name, v, "must be a text (a path) or None")

    def _check_paths(self) -> None:
        for name, suffix in (("out", ".mp4"), ("save_proxy", ".mp4"), ("save_latents", ".safetensors")):
            v = getattr(self, name)
            if v is None:
                continue
            p = Path(v)
            check(p.suffix.lower() == suffix, name, v, f"must end in {suffix}")
            check(p.parent.resolve().is_dir(), name, v, f"folder {p.parent} does not exist")

    def _check_geometry(self) -> None:
        """Every window grid of the schedule and the proxy must fit the token grid: refuse now, not mid-run."""
        grid = self.detail_grid
        if self.method.mode != "full":
            for window, shift in self.method.layer_entries():
                WindowSpec(grid, window, shift, pad=self.method.pad_windows)
            _ = self.proxy  # builds (and so validates) the proxy geometry

    @property
    def latent(self) -> Grid:
        return latent_grid(self.video.frames, self.video.gen_height, self.video.gen_width)

    @property
    def detail_grid(self) -> Grid:
        return token_grid(self.latent)

    @property
    def proxy(self) -> ProxyGeometry:
        return ProxyGeometry(self.detail_grid, self.method.temporal_scale, self.method.spatial_scale)

    @property
    def uses_proxy(self) -> bool:
        return self.method.mode == "atlas"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["video"] = {k: getattr(self.video, k) for k in ("width", "height", "frames", "fps", "pad_and_crop")}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GenerateConfig":
        d = dict(d)
        video = VideoSpec(**d.pop("video"))
        m = d.pop("method")
        if m.get("schedule") is not None:
            m["schedule"] = tuple((tuple(w), tuple(s)) for w, s in m["schedule"])
        method = AtlasConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
        return cls(video=video, method=method, **d)


@dataclass(frozen=True)
class DetailSchedule:
    """The detail stage's steps as they run: the one rule generate, the ranks and the cost model follow."""

    steps: int
    """Steps of the whole schedule (from pure noise)."""
    start: int
    """First step that runs (0 from noise; with detail_init 'proxy' the last round(steps * init_strength), at
    least one, run)."""
    guided_until: int
    """Steps before this index run classifier-free guidance (when the guidance scale enables it)."""

    @classmethod
    def of(cls, steps: int, detail_init: str, init_strength: float, cfg_until: float) -> "DetailSchedule":
        start = steps - max(1, round(steps * init_strength)) if detail_init == "proxy" else 0
        return cls(steps, start, round(steps * cfg_until))

    @property
    def run(self) -> int:
        """Steps that run."""
        return self.steps - self.start

    @property
    def guided(self) -> int:
        """Steps that run with guidance (two forwards each when the scale enables it)."""
        return max(0, min(self.steps, self.guided_until) - self.start)

    def forwards(self, uses_cfg: bool) -> int:
        """Detail forwards of the stage: one per step, plus the unconditional one of each guided step."""
        return self.run + (self.guided if uses_cfg else 0)


def auto_device() -> str:
    """The device 'auto' stands for here: 'cuda' when torch sees a CUDA device, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: object) -> object:
    """'auto' -> :func:`auto_device`; any other value unchanged (and checked by the config that holds it)."""
    return auto_device() if device == "auto" else device


def _finite(v: object) -> bool:
    """A finite int or float (not a bool, not NaN or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
