"""The CLI's demo runs the attention core; bad input exits 2 with a message naming the field, no traceback."""

import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "atlasvid_dist.cli.main", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # a 480p attention demo in a subprocess
def test_demo_runs_full_and_atlas():
    r = run_cli("demo", "--res", "480p", "--frames", "9")
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stdout and "fewer attention FLOPs" in r.stdout


@pytest.mark.parametrize(
    "args,field",
    [
        (["--frames", "8"], "frames"),
        # each case starts a Python subprocess; test_hostile_input checks the fields in process
        pytest.param(["--res", "1000x720"], "width", marks=pytest.mark.slow),
        pytest.param(["--res", "9k"], "res", marks=pytest.mark.slow),
        pytest.param(["--window", "3,15"], "window", marks=pytest.mark.slow),
        pytest.param(["--spatial-scale", "7"], "spatial_scale", marks=pytest.mark.slow),
    ],
)
def test_bad_input_exit_code_2(args, field):
    r = run_cli("demo", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and field in r.stderr and "Traceback" not in r.stderr


def test_unknown_option_exit_code_2():
    assert run_cli("demo", "--bogus").returncode == 2
