"""Option parsing shared by the commands."""

from __future__ import annotations

from ..errors import ConfigError


def parse_triple(field: str, text: str) -> tuple[int, int, int]:
    """'3,15,16' -> (3, 15, 16); anything else is a ConfigError naming the option."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ConfigError(field, text, "must be three integers T,H,W (e.g. 3,15,16)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]
