"""The lent-GPU session script, without a GPU: its plan, its budget rule, its JSON, its refusal on a CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu_session.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_session"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_session", None)


def test_dry_run_lists_every_step_and_records_the_environment(session, tmp_path, capsys):
    assert session.main(["--dry-run", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu-session-dry-run.json").read_text())
    assert [s["name"] for s in payload["steps"]] == [s.name for s in session.STEPS]
    # diffusers is installed here; the dry run spends the estimates: all fit the default budget but the last
    status = [s["status"] for s in payload["steps"]]
    assert status[:-1] == ["planned"] * (len(status) - 1) and status[-1].startswith("skipped: estimated")
    env = payload["environment"]
    assert {"device", "torch", "commit", "command"} <= env.keys()
    for step in payload["steps"]:  # every command names this interpreter and the results folder
        assert step["command"][0] == sys.executable and str(tmp_path) in step["command"]


def test_steps_run_in_order_inside_the_budget(session, tmp_path):
    py = session.Step
    steps = [
        py("ok", ("-c", "print('measured')"), 1),
        py("fails", ("-c", "import sys; sys.exit(3)"), 1),
        py("too-long", ("-c", "print('never')"), 10**6),
        py("needs-diffusers", ("-c", "print('never')"), 1, needs_diffusers=True),
        py("writes", ("-c", "import pathlib; pathlib.Path(r'{out}', 'r.json').write_text('{}')"), 1),
    ]
    got = session.run_steps(steps, 1000, tmp_path, False, False, ROOT)
    status = {r["name"]: r for r in got}
    assert status["ok"]["status"] == "ok" and "measured" in status["ok"]["output_tail"]
    assert status["fails"]["status"] == "failed" and status["fails"]["returncode"] == 3
    assert status["too-long"]["status"].startswith("skipped: estimated")
    assert status["needs-diffusers"]["status"].startswith("skipped: needs diffusers")
    assert status["writes"]["files"] == ["r.json"]


def test_without_cuda_the_session_refuses_to_start(session, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert session.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--budget", "0"]])
def test_bad_arguments_exit_2(session, argv):
    with pytest.raises(SystemExit) as e:
        session.parse(argv)
    assert e.value.code == 2


def test_every_step_names_a_script_and_options_it_has(session):
    for step in session.STEPS:
        target = step.argv[1].replace(".", "/") + ".py" if step.argv[0] == "-m" else step.argv[0]
        source = (ROOT / target).read_text()
        for flag in (a for a in step.argv if a.startswith("--")):
            assert f'"{flag}"' in source, (step.name, flag)


def test_a_wheel_that_does_not_install_is_reported_not_raised(session, tmp_path):
    assert session.install_wheels(tmp_path) == {str(tmp_path): "no wheels"}
    (tmp_path / "broken-0.0-py3-none-any.whl").write_bytes(b"not a zip")
    got = session.install_wheels(tmp_path)
    assert list(got) == ["broken-0.0-py3-none-any.whl"] and got["broken-0.0-py3-none-any.whl"] != "installed"
