"""Fault injection on the checkpoint writer: a process SIGKILLed at random moments while it commits steps never
leaves a step that loads partially — the newest committed step always loads whole, with the content of its step.

A rank's worker commits its strip after every step (runtime/detail.py) with the same StepCheckpointer; a crash
of that process is what a Ray actor death is. Here the writer is a plain subprocess killed with SIGKILL (no
cleanup, as a crash) at a spread of moments, so some kills land inside ``save_file``, some between the tensors and
the marker, some while pruning.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from atlasvid_dist.pipeline.checkpoint import StepCheckpointer

WRITER = textwrap.dedent("""
    import sys, torch
    from atlasvid_dist.pipeline.checkpoint import StepCheckpointer
    ck = StepCheckpointer(sys.argv[1], keep=2)
    step = (ck.latest() or 0) + 1
    while True:  # big enough that a write takes a few milliseconds
        lat = torch.full((1, 16, 8, 64, 64), float(step))
        ck.commit(step, {"latents": lat, "step": torch.tensor(step)}, {"step": step})
        print(step, flush=True)
        step += 1
""")


def expected(step: int) -> torch.Tensor:
    return torch.full((1, 16, 8, 64, 64), float(step))


@pytest.mark.slow
def test_kill_during_commit_never_loads_a_partial_step(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run_dir = tmp_path / "rank-0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    newest, partial = 0, 0
    for i in range(12):  # each round: restart the writer (it resumes after the newest commit), kill it mid-run
        proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, env=env, text=True)
        first = proc.stdout.readline()  # at least one commit of this round done
        assert first.strip().isdigit(), first
        time.sleep(0.003 + 0.011 * i)  # a spread of moments inside the next commits
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        ck = StepCheckpointer(run_dir, keep=2)
        latest = ck.latest()
        assert latest is not None and latest >= max(newest, int(first)), (latest, newest, first)
        partial += any(d.is_dir() and int(d.name[5:]) > latest for d in run_dir.glob("step-*"))
        tensors, meta = ck.load(latest)  # checksums verified: whole or refused
        assert meta == {"step": latest}
        assert int(tensors["step"]) == latest and torch.equal(tensors["latents"], expected(latest))
        newest = latest
    assert partial > 0, "no kill landed inside a commit: the test did not exercise a partial write"
