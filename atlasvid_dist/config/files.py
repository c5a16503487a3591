"""Configuration files (YAML or JSON): any dataclass config can be read from one; unknown keys are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def read_mapping(path: str | Path) -> dict:
    """Parse a YAML/JSON file into a dict, or raise ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(p), "file not found")
    text = _read_text(p)
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError("config", str(p), f"is not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(p), "must hold a mapping of field: value")
    return data


def _read_text(p: Path) -> str:
    """The file's text as UTF-8; a binary, non-UTF-8 or unreadable file is a ConfigError naming it."""
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError("config", str(p), f"cannot be read: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise ConfigError("config", str(p), "is a binary file, not YAML/JSON text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "config",
            str(p),
            f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8 YAML/JSON",
        ) from None


def from_mapping(cls: type[T], data: dict, source: str = "config", overrides: dict | None = None) -> T:
    """Build ``cls`` from ``data`` (+ overrides, which win); unknown keys raise ConfigError naming them."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    merged = {**data, **(overrides or {})}
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ConfigError(
            f"{source}: {unknown[0]}", merged[unknown[0]], f"unknown key; {cls.__name__} accepts {sorted(fields)}"
        )
    kwargs = {
        k: (tuple(tuple(e) if isinstance(e, list) else e for e in v) if isinstance(v, list) else v)
        for k, v in merged.items()
    }
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path, overrides: dict | None = None) -> T:
    return from_mapping(cls, read_mapping(path), str(path), overrides)
