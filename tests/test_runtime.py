"""Distributed generation on Ray (embedded, loopback, gloo): --workers N gives the single-process latents."""

import re

import pytest
import torch
from safetensors.torch import load_file

from atlasvid_dist.cli.main import main

ARGS = ["--prompt", "a red ball rolling", "--res", "256x256", "--frames", "9", "--steps", "2", "--proxy-steps", "2",
        "--window", "3,4,8", "--guidance", "3.0", "--spatial-scale", "2", "--quiet"]
# token grid (3, 16, 16), window (3, 4, 8): 8 windows (3 workers -> 3/3/2), shifted layers halve h and w


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    code = cli("generate", *ARGS, "--out", str(d / "a.mp4"), "--save-latents", str(d / "a.safetensors"))
    assert code == 0
    return load_file(str(d / "a.safetensors"))["latents"]


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_equal_single_process(tmp_path, capsys, single, workers):
    out, lat = tmp_path / "b.mp4", tmp_path / "b.safetensors"
    code = cli("generate", *ARGS, "--workers", str(workers), "--out", str(out), "--save-latents", str(lat))
    text = capsys.readouterr().out
    assert code == 0, text
    got = load_file(str(lat))["latents"]
    assert got.shape == single.shape
    assert float((got - single).abs().max()) <= 1e-5
    assert out.stat().st_size > 0
    sent = [float(m) for m in re.findall(r"rank \d+: ([0-9.]+) MB", text)]
    assert len(sent) == workers and all(s > 0 for s in sent), text  # shifted layers exchange a halo


def test_more_workers_than_windows_is_refused(tmp_path, capsys):
    out = tmp_path / "c.mp4"
    code = cli("generate", *ARGS, "--workers", "9", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "windows" in err
    assert not out.exists()


def test_workers_and_gpus_together_are_refused(tmp_path, capsys):
    code = cli("generate", *ARGS, "--workers", "2", "--gpus", "2", "--out", str(tmp_path / "d.mp4"))
    assert code == 2 and "gpus" in capsys.readouterr().err
