"""The command line's options come from the config dataclasses (cli/options.py, config/fields.py): every option's
help shows its default, the defaults are the dataclasses' own (a default changed there is the CLI's), plan and
generate share them, device 'auto' resolves, and a run of the random-weight tiny model says so on stderr."""

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from atlasvid_dist.cli.generate import DEFAULTS, OPTION_KINDS, build_config, random_weights_warning
from atlasvid_dist.cli.main import app
from atlasvid_dist.cli.options import OPTIONS
from atlasvid_dist.config import generate as generate_config
from atlasvid_dist.config.fields import MISSING, config_fields, field_docs, kind_of, literal_choices
from atlasvid_dist.config.generate import GenerateConfig
from atlasvid_dist.config.generate import auto_device as real_auto_device
from atlasvid_dist.config.method import MODES, AtlasConfig
from atlasvid_dist.config.video import DEFAULT_RES, VideoSpec

ROOT = Path(__file__).resolve().parents[1]
COMMAND = get_command(app)


def _options(command: str):
    return [p for p in COMMAND.commands[command].params if p.name != "help"]


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_every_option_help_ends_in_its_default(command):
    for p in _options(command):
        assert "[default: " in (p.help or ""), p.name


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_help_output_shows_every_default_in_panels(command):
    """The rendered --help (Rich panels) keeps every '[default: ...]' (Rich markup would swallow it unescaped)."""
    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    assert r.output.count("[default: ") == len(_options(command)), r.output
    for panel in ("Video", "Method", "Model", "Run", "Distributed", "Output"):
        assert f"─ {panel} ─" in r.output, panel
    assert "[default: 720p]" in r.output and "[default: tiny]" in r.output and "[default: auto]" in r.output


def test_defaults_are_the_dataclass_defaults():
    for name, o in OPTIONS.items():
        if o.source is None or o.cli_rule:  # no field, or a rule of the command line ('auto', 0 = auto)
            continue
        d = config_fields(o.source)[o.field or name].default
        want = None if d is MISSING else d
        got = DEFAULTS.get(name, o.value)
        assert (",".join(map(str, want)) if isinstance(want, tuple) else want) == got, name
    cfg = build_config({"prompt": "x", "out": "out.mp4"})
    plain = GenerateConfig(prompt="x", method=cfg.method)  # (AtlasConfig's own spatial_scale 2 does not tile 720p)
    for name in config_fields(GenerateConfig):
        if name not in ("prompt", "video", "method"):
            assert getattr(cfg, name) == getattr(plain, name), name
    assert (cfg.video.width, cfg.video.height) == (VideoSpec.from_res(DEFAULT_RES).width, plain.video.height)
    assert (cfg.video.frames, cfg.video.fps) == (plain.video.frames, plain.video.fps)
    m, am = cfg.method, AtlasConfig()
    for name in ("mode", "shift", "shift_axes", "temporal_scale", "proxy_context", "proxy_margin", "proxy_mode"):
        assert getattr(m, name) == getattr(am, name), name


def test_only_the_cli_rules_differ_from_the_fields():
    """What the command line defaults otherwise than its field is a rule it applies, listed here on purpose."""
    differ = {n for n, o in OPTIONS.items() if o.cli_rule}
    assert differ == {"window", "spatial_scale"}


def test_a_dataclass_default_changed_is_the_clis_default():
    """Plant a fault: GenerateConfig.steps and AtlasConfig.proxy_mode get other defaults before the CLI is
    imported; generate's and plan's defaults, help and built config follow."""
    code = (
        "import dataclasses\n"
        "from atlasvid_dist.config.generate import GenerateConfig\n"
        "from atlasvid_dist.config.method import AtlasConfig\n"
        "GenerateConfig.__dataclass_fields__['steps'].default = 7\n"
        "AtlasConfig.__dataclass_fields__['proxy_mode'].default = 'joint'\n"
        "from typer.testing import CliRunner\n"
        "from atlasvid_dist.cli.main import app\n"
        "from atlasvid_dist.cli.generate import DEFAULTS, build_config\n"
        "cfg = build_config({'prompt': 'x', 'device': 'cpu'})\n"
        "print(DEFAULTS['steps'], cfg.steps, cfg.method.proxy_mode)\n"
        "for c in ('generate', 'plan'):\n"
        "    h = CliRunner().invoke(app, [c, '--help'], env={'COLUMNS': '200'}).output\n"
        "    print(c, 'steps. [default: 7]' in h, '[default: joint]' in h)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:3] == ["7 7 joint", "generate True True", "plan True True"], r.stdout


def test_plan_and_generate_share_model_device_and_resolution():
    gen, plan = {p.name: p for p in _options("generate")}, {p.name: p for p in _options("plan")}
    for name in ("model", "device", "res", "frames", "fps", "attention", "steps", "dtype"):
        assert plan[name].default == DEFAULTS[name], name
        assert gen[name].default is None  # generate: None until a --config file or DEFAULTS fills it in
        assert gen[name].help.split("[default:")[1] == plan[name].help.split("[default:")[1], name
    assert (DEFAULTS["model"], DEFAULTS["res"], DEFAULTS["device"]) == ("tiny", "720p", "auto")


def test_the_config_file_kinds_come_from_the_field_types():
    assert OPTION_KINDS["steps"] == "int" and OPTION_KINDS["guidance"] == "float" and OPTION_KINDS["shift"] == "bool"
    assert OPTION_KINDS["lora_stage1"] == "str?" and OPTION_KINDS["proxy_margin"] == "triple"
    assert OPTION_KINDS["attention"] == "str" and "schedule" not in OPTION_KINDS  # AtlasConfig checks a schedule
    assert kind_of(typing.Optional[int]) is None and kind_of(tuple[int, int, int]) == "triple"
    assert literal_choices(config_fields(AtlasConfig)["mode"].type) == MODES
    assert field_docs(VideoSpec)["fps"] == "Output frames per second."


def test_device_auto_resolves(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert real_auto_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert real_auto_device() == "cpu"
    monkeypatch.setattr(generate_config, "auto_device", lambda: "cuda")
    assert GenerateConfig(prompt="x", method=AtlasConfig(mode="full")).device == "cuda"  # resolved when built
    assert build_config({"prompt": "x", "device": "auto"}).device == "cuda"
    assert build_config({"prompt": "x", "device": "cpu"}).device == "cpu"
    monkeypatch.setattr(generate_config, "auto_device", lambda: "cpu")
    assert GenerateConfig(prompt="x", method=AtlasConfig(mode="full")).to_dict()["device"] == "cpu"


def test_random_weights_warning_names_tiny_only(tmp_path):
    line = random_weights_warning("tiny")
    assert line.startswith("warning: model 'tiny' has random weights: the video will be noise") and "--model" in line
    assert random_weights_warning(str(tmp_path)) is None


def test_a_tiny_run_warns_on_stderr_and_shows_its_device(tmp_path):
    out = tmp_path / "a.mp4"
    args = ["--prompt", "x", "--res", "256x256", "--frames", "9", "--steps", "1", "--proxy-steps", "1"]
    r = CliRunner().invoke(app, ["generate", *args, "--window", "3,8,8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("warning: model 'tiny' has random weights: the video will be noise"), r.stderr[:500]
    assert "device: cpu (auto)" in r.stdout and out.stat().st_size > 0


def test_every_run_setting_is_a_generate_option():
    """Every GenerateConfig field (but the video and the method, which have options of their own) can be set on
    generate's command line (--offload-encoders was once settable only in a --config file while plan told users
    to pass it)."""
    names = {p.name for p in _options("generate")}
    missing = [f for f in config_fields(GenerateConfig) if f not in ("video", "method") and f not in names]
    assert missing == []
