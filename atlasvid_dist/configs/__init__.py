"""DeepSpeed configurations shipped inside the package (package data, so a non-editable install has them).

``--deepspeed-config zero2`` (or ``zero3``, ``zero3_offload``) names one of them; any other value is a path to a
user's JSON file. Read with importlib.resources, never through the checkout's folder layout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ConfigError

DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
"""Names of the packaged DeepSpeed JSONs (files ``ds_NAME.json`` in this package)."""
DEFAULT_DEEPSPEED = "zero2"
"""The DeepSpeed configuration used when none is given."""


def deepspeed_preset(name: str) -> str | None:
    """The preset a value names ('zero2' or 'ds_zero2'), or None when it is not a preset name."""
    stem = name[3:] if name.startswith("ds_") else name
    return stem if stem in DEEPSPEED_PRESETS else None


def read_deepspeed_text(spec: str) -> str:
    """The JSON text of a preset name or of a file path (ConfigError 'deepspeed_config' naming it when missing)."""
    preset = deepspeed_preset(str(spec))
    if preset is not None and not Path(spec).is_file():
        return resources.files(__name__).joinpath(f"ds_{preset}.json").read_text()
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(
            "deepspeed_config",
            str(spec),
            f"file not found (and not one of the packaged names {', '.join(DEEPSPEED_PRESETS)})",
        )
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("deepspeed_config", str(spec), f"cannot be read ({e})") from None


def read_deepspeed_config(spec: str) -> dict:
    """A DeepSpeed JSON object with a zero_optimization section, from a preset name or a path (ConfigError
    'deepspeed_config' naming it otherwise)."""
    import json

    try:
        data = json.loads(read_deepspeed_text(spec))
    except ValueError as e:
        raise ConfigError("deepspeed_config", str(spec), f"is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "zero_optimization" not in data:
        raise ConfigError("deepspeed_config", str(spec), "must be a JSON object with a zero_optimization section")
    return data
