"""AtlasConfig: how attention is done (full / atlas / ultragen), the window schedule, and the proxy settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import check

Mode = Literal["full", "atlas", "ultragen"]
ProxyContext = Literal["all", "aligned"]
ProxyMode = Literal["clean", "joint"]
Backend = Literal["auto", "reference", "sdpa", "flex"]
MODES, PROXY_CONTEXTS, PROXY_MODES, BACKENDS = (get_args(t) for t in (Mode, ProxyContext, ProxyMode, Backend))

Triple = tuple[int, int, int]


def _triple(field: str, value, *, minimum: int) -> Triple:
    check(isinstance(value, (tuple, list)) and len(value) == 3, field, value, "must be three integers (t, h, w)")
    check(all(isinstance(v, int) and not isinstance(v, bool) for v in value), field, value, "must be integers")
    check(all(v >= minimum for v in value), field, value, f"every entry must be >= {minimum}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class AtlasConfig:
    """Method settings. Every value is a setting (docs/method.md), validated here, before any work."""

    mode: Mode = "atlas"
    """'full' (plain Wan attention, the native baseline), 'atlas' (windows + proxy) or 'ultragen'."""
    window: Triple = (3, 15, 16)
    """Window size in tokens (t, h, w). (3,15,16) tiles 720P, 2K, 4K and 8K grids in space."""
    shift: bool = True
    """Alternate unshifted and half-window-shifted grids over layers (Swin-style hierarchical locality)."""
    shift_axes: str = "thw"
    """Axes the shifted grid moves along: 'thw' (all, the default) or a subset, e.g. 'hw': windows never shift
    across time, which removes most halo traffic between ranks (each rank owns slabs of time)."""
    schedule: tuple[tuple[Triple, Triple], ...] | None = None
    """General schedule of (window, shift) entries cycled over layers; overrides ``window``/``shift``."""
    temporal_scale: int = 4
    """r_t: proxy fps = target fps / r_t; proxy latent frame j sits at detail time position j*r_t."""
    spatial_scale: int = 2
    """Proxy token grid = detail token grid / spatial_scale in height and width (must divide)."""
    proxy_context: ProxyContext = "aligned"
    """Which proxy keys a detail window reads: 'all', or 'aligned' (the region above the window + margin)."""
    proxy_margin: Triple = (1, 1, 1)
    """Extra proxy tokens on each side of the aligned region (t, h, w)."""
    proxy_mode: ProxyMode = "clean"
    """'clean': proxy at timestep 0, its keys/values cached once. 'joint': re-noised to the detail timestep."""
    pad_windows: bool = False
    """Allow a window grid that does not tile the token grid (masked padding); refused otherwise."""
    backend: Backend = "auto"
    """Attention kernel: 'reference' (dense masked), 'sdpa' (windows stacked in batch), 'flex' (CUDA), 'auto'."""
    max_window_batch: int = 0
    """Windows per SDPA call (bounds transient memory); 0 = all at once."""
    ultragen_pool: Triple = (1, 4, 4)
    """UltraGen global branch: keys/values average-pooled by this factor (t, h, w)."""
    ultragen_weight: float = 0.5
    """UltraGen: output = (1 - w) * local + w * global."""

    def __post_init__(self) -> None:
        check(self.mode in MODES, "mode", self.mode, f"must be one of {MODES}")
        object.__setattr__(self, "window", _triple("window", self.window, minimum=1))
        check(isinstance(self.shift, bool), "shift", self.shift, "must be true or false")
        check(
            isinstance(self.shift_axes, str)
            and self.shift_axes != ""
            and set(self.shift_axes) <= set("thw")
            and len(set(self.shift_axes)) == len(self.shift_axes),
            "shift_axes",
            self.shift_axes,
            "must be a non-empty subset of 'thw' (each axis once), e.g. 'thw' or 'hw'",
        )
        if self.schedule is not None:
            check(
                isinstance(self.schedule, (tuple, list)) and len(self.schedule) > 0,
                "schedule",
                self.schedule,
                "must be a non-empty list of (window, shift) pairs",
            )
            entries = []
            for i, entry in enumerate(self.schedule):
                check(
                    isinstance(entry, (tuple, list)) and len(entry) == 2,
                    f"schedule[{i}]",
                    entry,
                    "must be a (window, shift) pair",
                )
                w = _triple(f"schedule[{i}].window", entry[0], minimum=1)
                s = _triple(f"schedule[{i}].shift", entry[1], minimum=0)
                check(all(a < b for a, b in zip(s, w)), f"schedule[{i}].shift", s, "each shift must be < its window")
                entries.append((w, s))
            object.__setattr__(self, "schedule", tuple(entries))
        for name in ("temporal_scale", "spatial_scale"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "must be an integer >= 1")
        check(
            self.proxy_context in PROXY_CONTEXTS,
            "proxy_context",
            self.proxy_context,
            f"must be one of {PROXY_CONTEXTS}",
        )
        object.__setattr__(self, "proxy_margin", _triple("proxy_margin", self.proxy_margin, minimum=0))
        check(self.proxy_mode in PROXY_MODES, "proxy_mode", self.proxy_mode, f"must be one of {PROXY_MODES}")
        check(isinstance(self.pad_windows, bool), "pad_windows", self.pad_windows, "must be true or false")
        check(self.backend in BACKENDS, "backend", self.backend, f"must be one of {BACKENDS}")
        check(
            isinstance(self.max_window_batch, int) and self.max_window_batch >= 0,
            "max_window_batch",
            self.max_window_batch,
            "must be an integer >= 0",
        )
        object.__setattr__(self, "ultragen_pool", _triple("ultragen_pool", self.ultragen_pool, minimum=1))
        check(
            isinstance(self.ultragen_weight, (int, float)) and 0.0 <= self.ultragen_weight <= 1.0,
            "ultragen_weight",
            self.ultragen_weight,
            "must be a number in [0, 1]",
        )

    def layer_entries(self) -> tuple[tuple[Triple, Triple], ...]:
        """The (window, shift) entries cycled over layers (shift in tokens, before clamping to the grid)."""
        if self.schedule is not None:
            return self.schedule
        if not self.shift:
            return ((self.window, (0, 0, 0)),)
        half = tuple(w // 2 if axis in self.shift_axes else 0 for w, axis in zip(self.window, "thw"))
        return ((self.window, (0, 0, 0)), (self.window, half))  # type: ignore[return-value]

    @property
    def uses_windows(self) -> bool:
        return self.mode in ("atlas", "ultragen")
