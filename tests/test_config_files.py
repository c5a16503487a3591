"""Config files: the shipped presets load; unknown keys and wrong types are refused naming the key."""

import pathlib

import pytest

from atlasvid_dist import AtlasConfig, ConfigError
from atlasvid_dist.config.files import load_config

CONFIGS = pathlib.Path(__file__).parents[1] / "configs" / "method"


@pytest.mark.parametrize("name", ["atlas", "ultragen", "full"])
def test_shipped_presets_load(name):
    cfg = load_config(AtlasConfig, CONFIGS / f"{name}.yaml")
    assert cfg.mode == name


def test_overrides_win_and_lists_become_tuples():
    cfg = load_config(AtlasConfig, CONFIGS / "atlas.yaml", {"spatial_scale": 2})
    assert cfg.spatial_scale == 2 and cfg.window == (3, 15, 16)


@pytest.mark.parametrize(
    "text,match",
    [
        ("windw: [3, 15, 16]\n", "windw"),
        ("window: abc\n", "window"),
        ("- a\n- b\n", "mapping"),
        ("mode: [unclosed\n", "not valid"),
    ],
)
def test_bad_files(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(AtlasConfig, p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(AtlasConfig, tmp_path / "nope.yaml")
