"""`atlasvid-dist train` and `prepare-data` check their paths before launching (exit 2 naming the path), and a
SIGTERMed or SIGKILLed `train` takes torchrun and every rank down with it (nothing left to race a --resume)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlasvid_dist.cli.main import main
from atlasvid_dist.train import launch
from atlasvid_dist.train.synthetic import write_synthetic_dataset
from tests.test_train import ZERO2, _cli_yaml, _no_launch

psutil = pytest.importorskip("psutil")
SCRIPT = str(Path(launch.__file__).with_name("train.py"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_synthetic_dataset(tmp_path_factory.mktemp("data"), num_videos=2, frames=13))


def _unwritable_output(tmp_path) -> Path:
    """A read-only folder's child; where chmod does not stop this user (root), a path under a regular file."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        (ro / "probe").mkdir()
    except OSError:
        return ro / "out"
    (ro / "probe").rmdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "out"


@pytest.mark.parametrize("command", ["train", "prepare-data"])
@pytest.mark.parametrize("problem", ["readonly", "model", "deepspeed_missing", "deepspeed_json", "data"])
def test_paths_are_checked_before_launching(command, problem, data_dir, tmp_path, monkeypatch, capsys):
    if command == "prepare-data" and problem.startswith("deepspeed"):
        pytest.skip("prepare-data takes no DeepSpeed config")
    monkeypatch.setattr(launch, "run_launcher", _no_launch)
    from atlasvid_dist.train import shards

    monkeypatch.setattr(shards, "prepare", _no_launch)
    out, data, model, ds = tmp_path / "out", data_dir, "tiny", ZERO2
    if problem == "readonly":
        out = _unwritable_output(tmp_path)
        expected = str(out)
    elif problem == "model":
        model = expected = str(tmp_path / "no-such-model")
    elif problem == "deepspeed_missing":
        ds = expected = str(tmp_path / "missing.json")
    elif problem == "deepspeed_json":
        ds = expected = str(tmp_path / "broken.json")
        Path(ds).write_text("{ not json")
    else:
        data = expected = str(tmp_path / "no-such-data")
    args = [
        command,
        "--stage",
        "1",
        "--data",
        data,
        "--output",
        str(out),
        "--model",
        model,
        "--config",
        _cli_yaml(tmp_path),
    ]
    with pytest.raises(SystemExit) as e:
        main(args + (["--deepspeed-config", ds] if command == "train" else []))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert expected in err and "Traceback" not in err


def _start_training(data_dir, tmp_path) -> tuple[subprocess.Popen, list]:
    """`atlasvid-dist train` on 2 ranks with many steps, returned once both ranks have logged a training step."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "atlasvid_dist.cli.main",
        "train",
        "--stage",
        "1",
        "--data",
        data_dir,
        "--output",
        str(out),
        "--num-processes",
        "2",
        "--config",
        _cli_yaml(tmp_path),
        "--deepspeed-config",
        ZERO2,
        "--max-steps",
        "100000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300  # bounded: start-up of two DeepSpeed ranks on a small machine
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train exited early with {proc.returncode}"
        tree = _alive(parent.children(recursive=True))
        ranks = [p for p in tree if _is_rank(p)]
        if len(ranks) == 2 and (out / "log.jsonl").is_file():  # training, not just starting
            return proc, tree
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the ranks did not start training within 300 s")


def _is_rank(p) -> bool:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    return SCRIPT in cmd and "torch.distributed.run" not in cmd


def _alive(procs: list) -> list:
    """The processes of ``procs`` still running (zombies count as gone)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _assert_all_exit(procs: list, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(procs)
    for p in left:  # do not leave them to the next test
        p.kill()
    assert not left, [p.cmdline() for p in left]


@pytest.mark.slow  # starts `train` on two DeepSpeed ranks and waits for a training step
def test_sigterm_stops_launcher_and_ranks(data_dir, tmp_path):
    proc, tree = _start_training(data_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 1  # RunFailure: training stopped by the signal
    _assert_all_exit(tree)


@pytest.mark.slow
def test_sigkill_of_train_takes_the_ranks_down(data_dir, tmp_path):
    proc, tree = _start_training(data_dir, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _assert_all_exit(tree)
