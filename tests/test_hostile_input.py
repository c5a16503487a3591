"""Hostile input is refused before any work with one `error:` line and exit code 2, never a traceback; sizes that
would exhaust the machine are refused from arithmetic (issue 12)."""

import errno
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlasvid_dist.cli.main import app
from atlasvid_dist.cli.plot import check_plot_path, folder_write_rule
from atlasvid_dist.config.generate import MAX_PROMPT_CHARS, GenerateConfig
from atlasvid_dist.config.video import MAX_TOKENS, VideoSpec
from atlasvid_dist.cost.profiles import PROFILES, device_profile, host_memory_bytes
from atlasvid_dist.errors import ConfigError, InputError
from atlasvid_dist.pipeline.video_io import Mp4Writer, write_failure_message

runner = CliRunner()
# --device cuda on a machine without CUDA: a config that passes validation stops at once, before any model loads.
GUARD = ["--device", "cuda"]


def refused(args, field):
    """Run the CLI; assert exit 2, no traceback, and one error line naming ``field``."""
    r = runner.invoke(app, args)
    assert not (r.exception and not isinstance(r.exception, SystemExit)), repr(r.exception)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and field in lines[0], r.output
    assert "Traceback" not in r.output
    return lines[0]


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


# -- config files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data,rule",
    [
        (b"\xff\xfe\x00\x01binary", "binary"),
        (b"prompt: caf\xe9\n", "UTF-8"),
        ("- a\n- b\n", "mapping"),
        ("just text\n", "mapping"),
        ("[1, 2]", "mapping"),
    ],
)
def test_unreadable_or_non_mapping_config(tmp_path, data, rule):
    line = refused(["generate", "--config", write(tmp_path, "c.yaml", data), *GUARD], "config")
    assert rule in line


@pytest.mark.parametrize(
    "key,value",
    [
        ("out", "123"),
        ("window", "5"),
        ("window", "[1, 2]"),
        ("window", "{a: 1}"),
        ("frames", "'x'"),
        ("fps", "1.5"),
        ("steps", "true"),
        ("seed", "1.5"),
        ("crf", "'x'"),
        ("text_len", "'x'"),
        ("guidance", "'x'"),
        ("guidance", ".nan"),
        ("flow_shift", ".inf"),
        ("init_strength", "'x'"),
        ("shift", "'maybe'"),
        ("pad_windows", "1"),
        ("prompt", "5"),
        ("negative_prompt", "[a]"),
        ("model", "5"),
        ("res", "5"),
        ("device_profile", "5"),
        ("lora_stage1", "5"),
        ("save_proxy", "5"),
        ("run_dir", "5"),
        ("attention", "5"),
    ],
)
def test_wrong_kind_in_yaml_names_the_option(tmp_path, key, value):
    text = f"{key}: {value}\n" + ("" if key == "prompt" else "prompt: a cat\n")
    refused(["generate", "--config", write(tmp_path, "c.yaml", text), *GUARD], key)


def test_wrong_kind_in_json(tmp_path):
    refused(["generate", "--config", write(tmp_path, "c.json", '{"window": 5, "prompt": "x"}'), *GUARD], "window")


def test_binary_device_profile_file(tmp_path):
    refused(["plan", "--device-profile", write(tmp_path, "p.yaml", b"\x00\xff")], "config")


# -- numbers on the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opt,value,field",
    [
        ("--guidance", "nan", "guidance"),
        ("--guidance", "inf", "guidance"),
        ("--flow-shift", "inf", "flow_shift"),
        ("--fps", "1000000000", "fps"),
        ("--seed", str(2**70), "seed"),
        ("--steps", "100000000000", "steps"),
        ("--text-len", "100000", "text_len"),
    ],
)
def test_generate_numbers_out_of_range(opt, value, field):
    if opt == "--text-len":  # not a CLI option: only via --config
        with pytest.raises(ConfigError, match=field):
            GenerateConfig(prompt="x", text_len=int(value))
        return
    refused(["generate", "--prompt", "x", opt, value, *GUARD], field)


def test_plan_non_finite_guidance_and_fps():
    refused(["plan", "--guidance", "inf"], "guidance")
    refused(["plan", "--fps", "1000000000"], "fps")


def test_fps_bounds():
    with pytest.raises(ConfigError, match="240"):
        VideoSpec.from_res("480p", frames=9, fps=241)
    with pytest.raises(InputError, match="fps"):
        Mp4Writer("v.mp4", fps=1e9, width=16, height=16)


# -- sizes refused from arithmetic ----------------------------------------------------------------------------
def test_huge_frame_count_refused_by_arithmetic():
    line = refused(["plan", "--res", "256x256", "--frames", "400001", "--pad-windows"], "res/frames")
    assert f"{MAX_TOKENS:,}" in line and "25,600,256" in line
    with pytest.raises(ConfigError, match="detail tokens"):  # huge numbers never reach the grid code
        VideoSpec(width=10**12, height=10**12, frames=10**20 + 1)


def test_demo_huge_resolution_refused_before_allocating():
    refused(["demo", "--res", "100000x100000"], "res/frames")
    line = refused(["demo", "--res", "4k", "--frames", "81"], "res/frames")
    assert "32,768" in line


def test_long_prompt_refused():
    with pytest.raises(ConfigError, match="prompt.*at most"):
        GenerateConfig(prompt="a" * (MAX_PROMPT_CHARS + 1))
    refused(["generate", "--prompt", "x", "--negative-prompt", "b" * (MAX_PROMPT_CHARS + 1), *GUARD], "negative_prompt")


# -- plan --plot ----------------------------------------------------------------------------------------------
def test_plot_destination_checked_before_the_plan():
    # --device-profile foo would be refused later: the plot's folder is refused first, before any cost model
    refused(["plan", "--plot", "/nonexistent-folder/x.png", "--device-profile", "foo"], "plot")


def test_plot_folder_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="existing folder"):
        check_plot_path(str(f / "x.png"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-555 folder")
def test_plot_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="not writable"):
        check_plot_path(str(ro / "x.png"))


def test_plot_folder_rule_names_the_errno():
    assert "read-only" in folder_write_rule(Path("/d"), OSError(errno.EROFS, "Read-only file system"))
    assert "permission" in folder_write_rule(Path("/d"), OSError(errno.EACCES, "Permission denied"))


# -- the CPU profile's memory ---------------------------------------------------------------------------------
def test_cpu_profile_reads_this_machines_memory(tmp_path):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < host_memory_bytes() <= physical
    assert PROFILES["cpu"].memory_bytes == host_memory_bytes()
    p = write(
        tmp_path,
        "cpu.yaml",
        "peak_flops: 100000000000\npeak_flops_fp32: 100000000000\nefficiency: 0.3\n"
        "window_efficiency: 0.2\nmemory_bytes: 1000000\nshared_memory: true\n",
    )
    assert device_profile(p).memory_bytes == 1_000_000


# -- a full disk ----------------------------------------------------------------------------------------------
def test_disk_full_message_from_ffmpeg_text_or_errno(tmp_path):
    path = tmp_path / "v.mp4"
    text = "[Errno 32] Broken pipe\n\nFFMPEG STDERR OUTPUT:\nav_interleaved_write_frame(): No space left on device\n"
    for msg in (write_failure_message(path, text), write_failure_message(path, "", errno.ENOSPC)):
        assert "No space left on device" in msg and str(path) in msg and "free" in msg
    assert "cannot read" not in write_failure_message(path, text)
    assert write_failure_message(path, "x\nEncoder error\n") == f"{path}: writing failed: Encoder error"
