"""generate's options reach every method setting: the shipped method files load with --config, a nested
``method:`` section works, and settings once unreachable (proxy_mode, proxy_margin, schedule, max_window_batch,
the UltraGen settings) arrive in the AtlasConfig."""

from pathlib import Path

import pytest

from atlasvid_dist.cli.generate import DEFAULTS, build_config, flatten_config_file
from atlasvid_dist.config.files import read_mapping
from atlasvid_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def config_from(mapping: dict, **flags):
    return build_config({**DEFAULTS, **flatten_config_file(mapping), "prompt": "a red disc", **flags})


@pytest.mark.parametrize("name", ["atlas", "ultragen", "full"])
def test_shipped_method_files_load_with_generate_config(name):
    mapping = read_mapping(ROOT / "configs" / "method" / f"{name}.yaml")
    cfg = config_from(mapping, res="4k")
    for key, value in mapping.items():
        got = getattr(cfg.method, key)
        assert got == (tuple(value) if isinstance(value, list) else value), key


def test_a_method_section_and_the_settings_the_cli_could_not_reach():
    schedule = [[[3, 15, 16], [0, 0, 0]], [[3, 15, 16], [1, 7, 8]]]
    cfg = config_from(
        {
            "method": {
                "mode": "atlas",
                "proxy_mode": "joint",
                "proxy_margin": [0, 2, 2],
                "schedule": schedule,
                "max_window_batch": 4,
            }
        },
        res="4k",
    )
    m = cfg.method
    assert (m.mode, m.proxy_mode, m.proxy_margin, m.max_window_batch) == ("atlas", "joint", (0, 2, 2), 4)
    assert m.schedule == (((3, 15, 16), (0, 0, 0)), ((3, 15, 16), (1, 7, 8)))


def test_command_line_strings_for_triples_and_ultragen():
    cfg = config_from(
        {}, res="4k", attention="ultragen", ultragen_pool="1,2,2", ultragen_weight=0.25, proxy_margin="1,0,0"
    )
    assert (cfg.method.ultragen_pool, cfg.method.ultragen_weight, cfg.method.proxy_margin) == (
        (1, 2, 2),
        0.25,
        (1, 0, 0),
    )


@pytest.mark.parametrize(
    "mapping,field",
    [
        ({"mode": "atlas", "attention": "full"}, "method.mode"),
        ({"method": {"window": [3, 15, 16]}, "window": "3,15,16"}, "method.window"),
        ({"method": 5}, "method"),
        ({"proxy_margin": 2}, "proxy_margin"),
        ({"proxy_mode": "later"}, "proxy_mode"),
    ],
)
def test_bad_method_settings_are_refused_by_name(mapping, field):
    with pytest.raises(ConfigError) as e:
        config_from(mapping, res="4k")
    assert e.value.field == field, e.value


@pytest.mark.parametrize(
    "res,window", [("720p", (3, 15, 16)), ("4k", (3, 15, 16)), ("832x480", (3, 15, 13)), ("1080p", (3, 17, 15))]
)
def test_the_default_window_tiles_the_requested_size(res, window):
    """Wan's own 480p and 1080p sizes failed with a fixed (3, 15, 16) default; 'auto' tiles them, unpadded."""
    cfg = config_from({}, res=res)
    assert (cfg.method.window, cfg.method.pad_windows) == (window, False)


def test_plan_and_generate_build_the_same_method():
    from typer.testing import CliRunner

    from atlasvid_dist.cli.main import app

    out = CliRunner().invoke(
        app, ["plan", "--model", "wan2.1-1.3b", "--res", "832x480", "--frames", "81", "--gpus", "1", "--json"]
    )
    assert out.exit_code == 0, out.output
    import json

    assert json.loads(out.output)["inputs"]["method"]["window"] == [3, 15, 13]


def test_proxy_only_refuses_a_job_without_a_proxy(tmp_path):
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    cfg = build_config({"model": "tiny", "prompt": "a red disc", "attention": "full", "out": str(tmp_path / "x.mp4")})
    with pytest.raises(ConfigError, match="makes no proxy"):
        TwoStageGenerator(cfg, progress=False).proxy_only(str(tmp_path / "proxy.mp4"))
    assert not (tmp_path / "proxy.mp4").exists()
