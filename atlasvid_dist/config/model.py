"""Model shapes: the Wan2.1 presets (as shapes, for planning and random-weight benchmarks) and the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check


@dataclass(frozen=True)
class VaeDecodeCost:
    """What decoding one tile costs per unit with a given VAE, traced from its config on the meta device
    (``models.vae_cost.trace_decode``): the cost model prices the decode from it, whatever the VAE's size."""

    bytes_per_tile_pixel: int
    """Peak activations of decoding one latent frame, bytes per output pixel of the tile (fp32; cache excluded)."""
    conv_io_bytes_per_tile_pixel: int
    """Input + output of the largest convolution, bytes per output pixel of the tile: what a convolution library's
    workspace is priced against (``DeviceProfile.conv_workspace``)."""
    state_bytes_per_cell: int
    """Causal-conv cache a tile keeps between latent frames, bytes per latent cell (fp32)."""
    flops_per_pixel: float
    """Decoder FLOPs per output pixel-frame."""


WAN21_VAE_DECODE = VaeDecodeCost(10_058, 4_608, 605_312, 8_446_418.0)
"""Wan2.1's VAE (diffusers' ``AutoencoderKLWan()`` defaults), traced; the cache per cell equals the one measured on
real tensors (``pipeline.decode.decoder_state_bytes_per_cell``: 605,312 B)."""
TINY_VAE_DECODE = VaeDecodeCost(283, 122, 8_696, 2_681.890625)
"""The tiny model's VAE (``models.tiny.TINY_VAE_CONFIG``), traced (a test keeps the two equal)."""


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a Wan2.1 text-to-video transformer (+ its text encoder and VAE where the cost model needs them)."""

    name: str
    """Preset name or the folder it was read from."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Attention heads."""
    head_dim: int
    """Channels per head."""
    ffn_dim: int
    """Feed-forward inner width."""
    in_channels: int = 16
    """Latent channels (must equal the VAE's z_dim)."""
    text_dim: int = 4096
    """Text-encoder hidden size fed to the transformer."""
    text_len: int = 512
    """Text tokens per prompt."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding width."""
    patch: tuple[int, int, int] = (1, 2, 2)
    """Patch size (t, h, w) in latent cells."""
    text_encoder_params: int = 5_700_000_000
    """Parameters of the text encoder (UMT5-XXL encoder by default)."""
    vae_params: int = 127_000_000
    """Parameters of the VAE."""
    vae_decode: VaeDecodeCost = WAN21_VAE_DECODE
    """The VAE's decode cost per tile pixel / cell (Wan2.1's VAE unless the model folder says otherwise)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "ffn_dim", "in_channels", "text_dim", "text_len"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, name, v, "must be a positive integer")
        check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (rotary embedding)")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head channels given to (time, height, width) rotary axes, as Wan splits them."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @property
    def transformer_params(self) -> int:
        """Parameter count of the transformer (attention, cross-attention, FFN, embeddings)."""
        d, f = self.dim, self.ffn_dim
        per_block = 4 * (d * d + d) + 4 * (d * d + d) + 2 * d * f + f + d + 4 * d + 6 * d
        embed = self.in_channels * d * 4 + d + self.text_dim * d + d * d + 2 * d + self.freq_dim * d + d
        embed += d * d + d + 6 * d * d + 6 * d
        head = d * self.in_channels * 4 + self.in_channels * 4 + 2 * d
        return self.num_layers * per_block + embed + head


MODEL_PRESETS: dict[str, ModelSpec] = {
    "wan2.1-1.3b": ModelSpec("wan2.1-1.3b", num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960),
    "wan2.1-14b": ModelSpec("wan2.1-14b", num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824),
    # Shapes of diffusers' own Wan tests: 2 layers, 2 heads x 12, text dim 32.
    "tiny": ModelSpec(
        "tiny",
        num_layers=2,
        num_heads=2,
        head_dim=12,
        ffn_dim=32,
        text_dim=32,
        text_len=512,
        text_encoder_params=50_000,
        vae_params=30_000,
        vae_decode=TINY_VAE_DECODE,
    ),
}


@dataclass(frozen=True)
class BaseSize:
    """The size a model was trained at ("at home"): the method's automatic choices aim the proxy and the window at
    it. Wan2.1's is 720P; a model folder may say its own in atlasvid_model.json (``base_width``, ``base_height``,
    ``window``)."""

    width: int = 1280
    """Training width in pixels."""
    height: int = 720
    """Training height in pixels."""
    window: tuple[int, int, int] = (3, 15, 16)
    """The window (t, h, w tokens) `--window auto` starts from: Wan's tiles 720P, 2K, 4K and 8K in space."""

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 16, f"base_{name}", v, "must be an integer >= 16")
        w = self.window
        check(
            isinstance(w, tuple) and len(w) == 3 and all(isinstance(x, int) and x >= 1 for x in w),
            "window",
            w,
            "must be three integers >= 1",
        )

    @property
    def frame_tokens(self) -> int:
        """Tokens in one frame at this size (16 px per token: 8x VAE, 2x2 patches); 720P: 45 x 80."""
        return (self.height // 16) * (self.width // 16)

    @classmethod
    def from_defaults(cls, defaults: dict) -> "BaseSize":
        """From a model folder's atlasvid_model.json (absent keys: Wan2.1's 720P)."""
        keys = {"base_width": "width", "base_height": "height", "window": "window"}
        found = {field: defaults[key] for key, field in keys.items() if key in defaults}
        if "window" in found and isinstance(found["window"], list):
            found["window"] = tuple(found["window"])
        return cls(**found)


WAN_BASE = BaseSize()
"""Wan2.1's own base size (720P) and window."""


def model_preset(name: str) -> ModelSpec:
    check(name in MODEL_PRESETS, "model", name, f"unknown preset; use one of {sorted(MODEL_PRESETS)} or a folder")
    return MODEL_PRESETS[name]
