"""What a run prints where nobody watches a terminal (a Ray job's log, CI): plain progress lines, a JSON summary,
and nothing at all on stderr with --quiet. The CLI runs in a subprocess so its stdout / stderr are pipes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlasvid_dist.pipeline.progress import LineProgress, progress_bar
from atlasvid_dist.runtime.progress import RankBars

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--prompt",
    "a red ball",
    "--res",
    "256x256",
    "--frames",
    "9",
    "--steps",
    "3",
    "--proxy-steps",
    "1",
    "--window",
    "3,8,8",
    "--spatial-scale",
    "2",
]
#: a deadline against a hang, not a speed test (a loaded 2-core machine runs this tiny job in about a minute)
RUN_S = 900


def test_line_progress_prints_one_line_per_tenth():
    out = io.StringIO()
    bar = LineProgress(30, "detail stage rank 2", stream=out)
    for _ in range(30):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("detail stage rank 2: step 3/30 (10%), ") and " s/step, ETA " in lines[0]
    assert lines[-1].startswith("detail stage rank 2: step 30/30 (100%)")


def test_line_progress_of_fewer_steps_than_tenths_and_a_resume():
    out = io.StringIO()
    bar = LineProgress(2, "proxy stage", initial=1, stream=out)  # resumed after step 1: only step 2 is left
    bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().strip()] and "step 2/2 (100%)" in out.getvalue()


def test_bars_are_plain_lines_off_a_terminal_and_silent_when_disabled():
    out = io.StringIO()
    assert isinstance(progress_bar(5, "x", stream=out), LineProgress)
    assert not isinstance(progress_bar(5, "x", stream=out, enabled=False), LineProgress)
    bars = RankBars(total=4, ranks=2, desc="detail stage", stream=out)
    bars.update([1, 2])
    bars.update([4, None])
    bars.finish()
    bars.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4, lines  # rank 0: 1, 4; rank 1: 2, 4
    assert "detail stage rank 1: step 2/4 (50%)" in lines[1] and lines[-1].startswith("detail stage rank 1: step 4/4")


def _generate(tmp_path, *args):
    """`atlasvid-dist generate` in a subprocess (stdout and stderr are pipes, not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "atlasvid_dist.cli.main", "generate", *TINY, *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_S)


@pytest.mark.slow
def test_a_run_off_a_terminal_prints_lines_and_a_json_summary_last(tmp_path):
    run = _generate(tmp_path, "--out", "a.mp4", "--save-latents", "a.safetensors", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    err = run.stderr
    assert "\r" not in err, err[-3000:]
    steps = [line for line in err.splitlines() if " stage: step " in line]
    assert len(steps) == 1 + 3, err  # proxy 1 step, detail 3 steps: one line each (fewer steps than tenths)
    assert len([line for line in err.splitlines() if line.startswith("decode: frame ")]) <= 9, err
    assert "loading model tiny ... " in err and "encoding prompt ... " in err
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["paths"] == {
        "video": str(tmp_path / "a.mp4"),
        "proxy": None,
        "latents": str(tmp_path / "a.safetensors"),
    }
    assert (summary["width"], summary["height"], summary["frames"], summary["fps"]) == (256, 256, 9, 16)
    assert summary["model"] == {"name": "tiny", "folder": None, "random_weights": True} and summary["seed"] == 0
    assert set(summary["seconds"]) >= {"load", "text", "proxy", "detail", "decode"}
    assert set(summary["median_step_seconds"]) == {"proxy", "detail"}
    assert summary["wall_seconds"] >= sum(summary["seconds"].values()) * 0.99
    assert summary["peak_memory"][0]["rank"] == 0 and summary["peak_memory"][0]["cpu_max_rss_bytes"] > 1e6
    assert summary["workers"] == 1 and summary["bytes_sent"] is None


@pytest.mark.slow
def test_quiet_prints_nothing_on_stderr(tmp_path):
    run = _generate(tmp_path, "--out", "q.mp4", "--quiet")
    assert run.returncode == 0 and run.stderr == "", run.stderr[-3000:]
    assert (tmp_path / "q.mp4").stat().st_size > 0


def test_silence_libraries_turns_off_their_bars_and_warnings():
    """In a fresh process (the switches are process-wide): errors only, and no bars, from the three libraries."""
    code = (
        "from atlasvid_dist.cli.quiet import silence_libraries; silence_libraries(); import logging\n"
        "import diffusers.utils.logging as d, transformers.utils.logging as t, huggingface_hub.utils as h\n"
        "print(t.get_verbosity() == logging.ERROR, d.get_verbosity() == logging.ERROR,\n"
        "      t.is_progress_bar_enabled(), d.is_progress_bar_enabled(), h.are_progress_bars_disabled())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=RUN_S)
    assert run.stdout.split() == ["True", "True", "False", "False", "True"], run.stderr[-2000:]
