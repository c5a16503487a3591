"""Multi-node training through the `deepspeed` launcher's hostfile path, on loopback.

DeepSpeed's multi-node runner (pdsh) ssh-es into every host of the hostfile and runs, on each,
``python -m deepspeed.launcher.launch --world_info=... --node_rank=N --master_addr=... --master_port=...`` followed
by the training script. ``deepspeed --no_ssh --node_rank N`` runs that same per-node command on the machine it is
started on. This test starts it twice here, node 0 and node 1 of a two-host hostfile, both reaching the rendezvous
at 127.0.0.1: the hostfile parsing, the world info, the global rank of each node's process, our script under
DeepSpeed's launcher and ZeRO-2 across the two launchers' ranks (gloo) are real. Not exercised: pdsh and ssh, the
environment DeepSpeed exports to remote hosts, a network between machines, NCCL. cluster/README.md says the same.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from atlasvid_dist.train.state import CHECKPOINTS, load_state
from atlasvid_dist.train.synthetic import write_synthetic_dataset
from tests._dist import free_port
from tests.test_train import _cli_yaml

REPO = Path(__file__).resolve().parents[1]
NODE_CMD = (
    "deepspeed --hostfile HOSTFILE --no_ssh --node_rank N --master_addr MASTER_ADDR --master_port PORT "
    "atlasvid_dist/train/train.py --deepspeed --deepspeed_config zero2 --config"
)
"""The per-node command cluster/README.md gives for nodes without pdsh/ssh, which the test runs as it is (with
MASTER_ADDR = 127.0.0.1)."""
TIMEOUT_S = 480


def _node_command(node: int, hostfile: Path, port: int, script_args: list[str]) -> list[str]:
    """NODE_CMD for ``node``, with the `deepspeed` entry point run by this Python (same venv, no PATH lookup)."""
    words = (
        NODE_CMD.replace("HOSTFILE", str(hostfile))
        .replace("MASTER_ADDR", "127.0.0.1")
        .replace("PORT", str(port))
        .split()
    )
    words[words.index("N")] = str(node)
    return [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()", *words[1:], *script_args]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the process groups (launcher and ranks) of the nodes still running."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow
def test_two_node_hostfile_launch_trains_one_zero2_group_on_loopback(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never resolves them
    out = tmp_path / "run"
    script_args = [
        _cli_yaml(tmp_path),
        "--stage",
        "1",
        "--data",
        str(data),
        "--model",
        "tiny",
        "--output",
        str(out),
        "--max-steps",
        "2",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GLOO_SOCKET_IFNAME": "lo",
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    procs = [
        subprocess.Popen(
            _node_command(n, hostfile, port, script_args),
            cwd=REPO,
            env=env,
            stdout=logs[n],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for n in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        _stop(procs)
        for f in logs:
            f.close()
    text = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    for n, t in enumerate(text):  # DeepSpeed's launcher: both nodes in one world, this node's process at rank n
        assert "dist_world_size=2" in t and f"node_rank={n}" in t, t[-3000:]
    tensors, meta = load_state(out / CHECKPOINTS, 2)
    assert meta["world"] == 2 and tensors["rng/cpu"].shape[0] == 2  # state gathered from both nodes' ranks
    assert (out / "adapter.safetensors").stat().st_size > 0
    steps = [line for line in (out / "log.jsonl").read_text().splitlines() if line]
    assert len(steps) == 2


def test_cluster_readme_gives_the_node_command_the_test_runs():
    text = " ".join((REPO / "cluster" / "README.md").read_text().replace("\\\n", " ").split())
    assert NODE_CMD in text
