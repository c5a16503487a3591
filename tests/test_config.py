"""Configuration and geometry validation: every bad input is refused with the typed error naming the field."""

import pathlib
import re

import pytest

from atlasvid_dist import AtlasConfig, AtlasError, ConfigError
from atlasvid_dist.config import VideoSpec, model_preset
from atlasvid_dist.geometry import Grid, ProxyGeometry, WindowSpec, latent_grid, token_grid

BAD_CONFIGS = [
    (dict(mode="sparse"), "mode"),
    (dict(window=(0, 15, 16)), "window"),
    (dict(window=(3, 15)), "window"),
    (dict(window=(3.0, 15, 16)), "window"),
    (dict(temporal_scale=0), "temporal_scale"),
    (dict(spatial_scale=1.5), "spatial_scale"),
    (dict(proxy_context="some"), "proxy_context"),
    (dict(proxy_mode="dirty"), "proxy_mode"),
    (dict(proxy_margin=(-1, 0, 0)), "proxy_margin"),
    (dict(backend="cudnn"), "backend"),
    (dict(ultragen_weight=1.5), "ultragen_weight"),
    (dict(ultragen_pool=(1, 0, 4)), "ultragen_pool"),
    (dict(shift="yes"), "shift"),
    (dict(schedule=[((3, 15, 16), (3, 0, 0))]), "schedule[0].shift"),
    (dict(schedule=[]), "schedule"),
    (dict(max_window_batch=-1), "max_window_batch"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS)
def test_bad_atlas_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        AtlasConfig(**kwargs)
    assert e.value.field == field
    assert field in str(e.value) and e.value.exit_code == 2


BAD_VIDEOS = [
    (lambda: VideoSpec.from_res("720p", frames=80), "frames"),
    (lambda: VideoSpec.from_res("720p", frames=0), "frames"),
    (lambda: VideoSpec.from_res("1000x720"), "width"),
    (lambda: VideoSpec.from_res("1280x700"), "height"),
    (lambda: VideoSpec.from_res("5k"), "res"),
    (lambda: VideoSpec.from_res("720p", fps=0), "fps"),
]


@pytest.mark.parametrize("make,field", BAD_VIDEOS)
def test_bad_video_spec_names_field(make, field):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.field == field


def test_1080p_pads_and_crops():
    v = VideoSpec.from_res("1080p", frames=81)
    assert (v.gen_width, v.gen_height) == (1920, 1088) and v.cropped
    assert not VideoSpec.from_res("4k").cropped


@pytest.mark.parametrize(
    "res,frames,tokens",
    [
        ("720p", 81, 75_600),
        ("2k", 81, 302_400),
        ("4k", 81, 680_400),
        ("8k", 29, 1_036_800),
        ("4k", 161, 1_328_400),
        ("2k", 321, 1_166_400),
    ],
)
def test_token_counts_match_design(res, frames, tokens):
    v = VideoSpec.from_res(res, frames=frames)
    assert token_grid(latent_grid(v.frames, v.gen_height, v.gen_width)).size == tokens


@pytest.mark.parametrize("res", ["720p", "2k", "4k", "8k"])
def test_default_window_tiles_presets_in_space(res):
    v = VideoSpec.from_res(res, frames=81)
    g = token_grid(latent_grid(v.frames, v.gen_height, v.gen_width))
    spec = WindowSpec(g, AtlasConfig().window)
    assert not spec.padded and spec.num_windows * spec.window_tokens == g.size


def test_window_not_dividing_is_refused_unless_padded():
    g = Grid(8, 270, 480)  # 8K x 29 frames: 8 latent frames, window t=3 does not divide
    with pytest.raises(ConfigError) as e:
        WindowSpec(g, (3, 15, 16))
    assert e.value.field == "window.t" and "pad_windows" in str(e.value)
    assert WindowSpec(g, (3, 15, 16), pad=True).padded
    with pytest.raises(ConfigError, match="window.h"):
        WindowSpec(Grid(3, 4, 4), (1, 5, 4))
    with pytest.raises(ConfigError, match="shift.w"):
        WindowSpec(Grid(3, 8, 8), (1, 4, 4), (0, 0, 4))


def test_proxy_geometry_extends_instead_of_changing_frames():
    aligned = ProxyGeometry(Grid(21, 135, 240), temporal_scale=4, spatial_scale=3)
    assert aligned.grid.dims == (6, 45, 80) and not aligned.extended
    ext = ProxyGeometry(Grid(8, 270, 480), temporal_scale=4, spatial_scale=6)  # 29 frames
    assert ext.grid.t == 3 and ext.extended and (ext.grid.t - 1) * 4 >= 8 - 1
    with pytest.raises(ConfigError, match="spatial_scale"):
        ProxyGeometry(Grid(21, 135, 240), temporal_scale=4, spatial_scale=2)


def test_321_frame_target_has_81_frame_proxy():
    p = ProxyGeometry(Grid(81, 90, 160), temporal_scale=4, spatial_scale=2)
    assert p.pixel_frames() == 81 and p.grid.size == 21 * 45 * 80


def test_model_presets():
    assert model_preset("wan2.1-14b").dim == 5120 and model_preset("wan2.1-1.3b").rope_dims == (44, 42, 42)
    with pytest.raises(ConfigError, match="model"):
        model_preset("wan9")


def test_errors_are_one_family():
    assert issubclass(ConfigError, AtlasError)


def test_no_assert_statements_in_package():
    """Input checks must survive python -O: the package raises, it never asserts."""
    root = pathlib.Path(__file__).parents[1] / "atlasvid_dist"
    offenders = [
        f"{p}:{i}"
        for p in root.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.match(r"\s*assert\b", line)
    ]
    assert offenders == []


def test_shift_axes_choose_the_axes_the_shifted_grid_moves_along():
    from atlasvid_dist.config.method import AtlasConfig

    assert AtlasConfig(window=(3, 15, 16)).layer_entries()[1][1] == (1, 7, 8)
    assert AtlasConfig(window=(3, 15, 16), shift_axes="hw").layer_entries()[1][1] == (0, 7, 8)
    assert AtlasConfig(window=(3, 15, 16), shift_axes="t").layer_entries()[1][1] == (1, 0, 0)
    for bad in ("", "xy", "tt", 3):
        with pytest.raises(ConfigError, match="shift_axes"):
            AtlasConfig(shift_axes=bad)
