"""cluster/: the launcher config passes Ray's own schema, the KubeRay RayJob is complete and its command parses
and fits, the submission script builds the right request, and `ray job submit` against a local head node (started
here, loopback) runs a tiny distributed generation to completion."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER))
import submit_job  # noqa: E402


def test_launcher_config_passes_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    gpu = cfg["available_node_types"]["h100x8"]
    assert gpu["resources"]["GPU"] == 8 and cfg["available_node_types"][cfg["head_node_type"]]["resources"]["CPU"] == 0


def _generate_params(args: list[str]) -> dict:
    """Parse a generate command line with the CLI's own parser (types, choices), without running it."""
    from typer.main import get_command

    from atlasvid_dist.cli.main import app

    group = get_command(app)
    ctx = group.make_context("atlasvid-dist", list(args), resilient_parsing=False)
    sub = group.get_command(ctx, args[0])
    return sub.make_context(args[0], list(args[1:]), parent=ctx).params


def test_rayjob_manifest_is_complete_and_its_run_fits():
    from atlasvid_dist.cli.main import main

    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    for key in (
        "entrypoint",
        "runtimeEnvYAML",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "rayClusterSpec",
    ):
        assert key in spec, key
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["atlasvid-dist", "generate"]
    params = _generate_params(args[1:])
    assert params["gpus"] == worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    # the same geometry on the model's shapes fits 8 H100s by the cost model (plan exits 0 when it fits)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "plan",
                "--model",
                "wan2.1-1.3b",
                "--res",
                params["res"],
                "--frames",
                str(params["frames"]),
                "--gpus",
                "8",
                "--json",
            ]
        )
    assert e.value.code == 0


def test_submit_script_builds_the_request(capsys):
    assert (
        submit_job.main(["--address", "http://h:8265", "--dry-run", "generate", "--", "--gpus", "8", "--prompt", "a b"])
        == 0
    )
    req = json.loads(capsys.readouterr().out)
    assert req["entrypoint"] == "atlasvid-dist generate --gpus 8 --prompt 'a b'"
    assert req["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1" and req["entrypoint_num_gpus"] == 0
    ns = submit_job.parse(["--gpus", "8", "--working-dir", ".", "--pip", "train", "--", "--stage", "1"])
    req = submit_job.request(ns)
    assert req["entrypoint"] == "atlasvid-dist train --stage 1" and req["entrypoint_num_gpus"] == 8
    assert req["runtime_env"]["pip"] == ["."]
    with pytest.raises(SystemExit) as e:
        submit_job.parse(["--pip", "generate"])
    assert e.value.code == 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: seconds a `ray start` / `ray stop` or a whole tiny job may take: deadlines against a hang, not a speed test (a
#: loaded 2-core machine starts a head in minutes and runs the job in many)
START_S, JOB_S = 600, 1800


def _token_file(folder: Path) -> Path:
    """A fresh Ray auth token in ``folder`` (mode 600, as Ray's own docs ask)."""
    import secrets

    path = folder / "ray-auth-token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback with the job API and token auth (a token made here), in its own temp dir; stopped
    afterwards. The returned environment is a client's: RAY_AUTH_MODE=token and the token's path."""
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_token_file(tmp_path)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }  # the job's shell finds atlasvid-dist
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    port, dash = _port(), _port()
    temp = Path("/tmp") / f"atlasvid-head-{port}"  # short: Ray's socket paths have a length limit
    start = [
        str(Path(bindir) / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--num-cpus",
        "3",
        "--include-dashboard",
        "true",
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=START_S)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(Path(bindir) / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=START_S)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # starts a Ray head in a subprocess
def test_the_test_head_refuses_a_client_with_a_wrong_token(head):
    """The head above enforces its token: a job API client with another token is turned away."""
    address, env = head
    anon = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    cmd = [
        sys.executable,
        "-c",
        "import sys; from ray.job_submission import JobSubmissionClient as C; C(sys.argv[1]).list_jobs()",
        address,
    ]
    run = subprocess.run(
        cmd,
        env={**anon, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        capture_output=True,
        text=True,
        timeout=START_S,
    )
    assert run.returncode != 0 and ("auth" in run.stderr.lower() or "401" in run.stderr), run.stderr[-2000:]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=START_S)
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.slow
def test_ray_job_submit_runs_a_tiny_distributed_generation(head, tmp_path):
    address, env = head
    out = tmp_path / "job.mp4"
    cmd = [
        sys.executable,
        str(CLUSTER / "submit_job.py"),
        "--address",
        address,
        "generate",
        "--",
        "--prompt",
        "a red ball",
        "--res",
        "256x256",
        "--frames",
        "9",
        "--steps",
        "2",
        "--proxy-steps",
        "2",
        "--window",
        "3,4,8",
        "--spatial-scale",
        "2",
        "--workers",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_S)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "SUCCEEDED" in log and "2 detail workers" in log and "atlasvid rank 1: stage 2 done" in log, log[-4000:]
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_ray_job_submit_runs_training(head, tmp_path):
    """The same `atlasvid-dist train` command as on one machine, as a Ray job on the cluster's node."""
    from atlasvid_dist.train.synthetic import write_synthetic_dataset

    address, env = head
    data = write_synthetic_dataset(tmp_path / "data", num_videos=2, frames=13)
    conf = tmp_path / "small.yaml"
    conf.write_text(
        yaml.safe_dump(
            dict(
                width=64,
                height=64,
                frames=9,
                temporal_scale=2,
                spatial_scale=2,
                window=[3, 2, 2],
                text_len=16,
                lora_rank=4,
                lora_alpha=4.0,
            )
        )
    )
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(CLUSTER / "submit_job.py"),
        "--address",
        address,
        "train",
        "--",
        "--stage",
        "1",
        "--data",
        str(data),
        "--model",
        "tiny",
        "--output",
        str(out),
        "--config",
        str(conf),
        "--max-steps",
        "2",
        "--num-processes",
        "2",
        "--deepspeed-config",
        "zero2",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_S)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "SUCCEEDED" in log, log[-4000:]
    assert (out / "adapter.safetensors").stat().st_size > 0


#: cluster/README.md's commands for a cluster by hand (a CPU-only head that only schedules, then every GPU node),
#: which the GPU test below starts as they are, adding only what a test on one machine needs (see _start_node)
README_HEAD = "ray start --head --port 6379 --dashboard-host 127.0.0.1 --num-cpus 0"
README_NODE = "ray start --address HEAD:6379"
README_SUBMIT = (
    'ray job submit --address http://127.0.0.1:8265 --runtime-env-json \'{"env_vars": {"HF_HUB_OFFLINE": "1"}}\' --'
)


def test_readme_gives_the_commands_the_gpu_cluster_test_runs():
    text = " ".join((CLUSTER / "README.md").read_text().replace("\\\n", " ").split())
    for command in (README_HEAD, README_NODE, README_SUBMIT):
        assert command in text, command


def _start_node(command: str, env: dict, log: Path, **subs) -> subprocess.Popen:
    """One of README's `ray start` commands with --block, in its own process group (``_stop_node`` ends that group,
    only the processes this test started); ``subs`` replace the README's placeholders (HEAD, 6379, 8265)."""
    args = shlex.split(command)
    for old, new in subs.items():
        args = [a.replace(old, new) for a in args]
    args[0] = str(Path(sys.executable).parent / "ray")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*args, "--block", "--disable-usage-stats"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop_node(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(what: str, predicate, node: subprocess.Popen, log: Path, timeout: float = START_S) -> None:
    """Poll ``predicate`` until it holds; fail at once when ``node`` (its `ray start --block`) has exited."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert node.poll() is None, f"{what}: `ray start` exited with {node.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} within {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(2)


@pytest.fixture
def gpu_cluster(tmp_path):
    """README's layout on loopback: a head with no CPUs and no GPUs (it only schedules; the job's driver runs
    there), and a second node declaring 2 GPUs it does not have (the placement group forms; CUDA does not exist).
    Token auth as in ``head``. Yields (job API address, client environment, log of both nodes)."""
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_token_file(tmp_path)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "CUDA_VISIBLE_DEVICES"):  # a node declaring GPUs checks this
        env.pop(key, None)
    port, dash, log = str(_port()), str(_port()), tmp_path / "nodes.log"
    temp = Path("/tmp") / f"atlasvid-head-{port}"
    head = _start_node(
        f"{README_HEAD} --node-ip-address 127.0.0.1 --dashboard-port {dash} --include-dashboard true "
        f"--temp-dir {temp} --num-gpus 0",
        env,
        log,
        **{"6379": port},
    )
    nodes = [head]
    try:
        status = [str(Path(bindir) / "ray"), "status", "--address", f"127.0.0.1:{port}"]
        _wait_for(
            "the head started", lambda: subprocess.run(status, env=env, capture_output=True).returncode == 0, head, log
        )
        nodes.append(
            _start_node(
                f"{README_NODE} --node-ip-address 127.0.0.1 --num-cpus 3 --num-gpus 2",
                env,
                log,
                HEAD="127.0.0.1",
                **{"6379": port},
            )
        )
        _wait_for(
            "the GPU node joined",
            lambda: "/2.0 GPU" in subprocess.run(status, env=env, capture_output=True, text=True).stdout,
            nodes[-1],
            log,
        )
        yield f"http://127.0.0.1:{dash}", env, log
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_gpu_job_on_a_cpu_only_head_asks_the_cluster_and_fails_in_the_workers(gpu_cluster, tmp_path):
    """`ray job submit -- atlasvid-dist generate --gpus 2` with the driver on a head without CUDA: the driver's
    check asks Ray (2 GPUs: enough) instead of refusing for want of its own CUDA; the run reaches the workers,
    which report that their torch finds no CUDA device (none exists here): exit 1, naming every worker."""
    address, env, log = gpu_cluster
    submit = shlex.split(README_SUBMIT.replace("http://127.0.0.1:8265", address))
    submit[0] = str(Path(sys.executable).parent / "ray")
    cmd = [
        *submit,
        "atlasvid-dist",
        "generate",
        "--gpus",
        "2",
        "--prompt",
        "a red ball",
        "--res",
        "256x256",
        "--frames",
        "9",
        "--steps",
        "1",
        "--proxy-steps",
        "1",
        "--window",
        "3,4,8",
        "--spatial-scale",
        "2",
        "--out",
        str(tmp_path / "never.mp4"),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_S)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-4000:] + log.read_text()[-2000:]
    assert "requested but no CUDA device is available" not in out, out[-4000:]
    import re

    for worker in ("proxy worker", "detail rank 0", "detail rank 1"):  # Ray may name the node by its LAN address
        assert re.search(rf"(error: |; ){worker} on node [0-9.]+: --gpus runs on CUDA", out), out[-4000:]
    assert "finds no usable CUDA device" in out and not (tmp_path / "never.mp4").exists()


def test_driver_on_a_cluster_refuses_more_gpus_than_ray_has(tmp_path):
    """The cluster check counts the cluster's GPUs (as Ray reports them), naming what the run needs and has."""
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.errors import PlanError
    from atlasvid_dist.pipeline.generate import TwoStageGenerator
    from atlasvid_dist.runtime.driver import DistributedGenerator

    class Cluster:
        """What the check asks of ``ray``: the cluster's resources (2 GPUs on a node, a CPU-only head)."""

        @staticmethod
        def cluster_resources():
            return {"CPU": 16.0, "GPU": 2.0, "accelerator_type:H200": 1.0}

    cfg = build_config({**DEFAULTS, "prompt": "x", "device": "cuda", "out": str(tmp_path / "x.mp4")})
    for workers, refused in ((8, True), (2, False)):
        driver = DistributedGenerator(cfg, workers, ray_address="auto")
        driver._gen = TwoStageGenerator(cfg, local_device=False)  # no CUDA needed here
        if refused:
            with pytest.raises(PlanError, match=r"8 workers need 8 GPU in all; the Ray cluster has 2"):
                driver._check_cluster(Cluster())
        else:
            driver._check_cluster(Cluster())
            assert driver._gen.gpu_name == "H200"
