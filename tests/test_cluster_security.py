"""cluster/: the shipped configs require Ray token auth and keep the dashboard / job API off public addresses.

Parses ray-cluster.yaml (and the shell commands that start Ray in it) and the KubeRay RayJob, and fails on an open
dashboard (0.0.0.0 / :: or KubeRay's 0.0.0.0 default), a Ray process or client without RAY_AUTH_MODE=token, or a
token that does not come from a secret (a synced token file, a Kubernetes Secret). The docs and the submit script
must not advise turning auth off.
"""

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
OPEN_HOSTS = {"0.0.0.0", "::", "[::]", ""}
TOKEN_ENV = "RAY_AUTH_TOKEN_PATH"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _shell_env_and_ray_starts(command: str) -> tuple[dict[str, str], list[list[str]]]:
    """Variables a shell command line exports / prefixes, and the argv of every `ray start` in it."""
    env, starts = {}, []
    for part in re.split(r"\s*(?:;|&&|\|\|)\s*", command):
        words = shlex.split(part)
        if words[:1] == ["export"]:
            words = words[1:]
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words[:2] == ["ray", "start"]:
            starts.append(words)
    return env, starts


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in argv (None when absent)."""
    for i, word in enumerate(argv):
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
        if word == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def launcher_problems(cfg: dict) -> list[str]:
    """What leaves a cluster started from this Ray launcher config open (empty: nothing)."""
    problems = []
    mounts = cfg.get("file_mounts", {})
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = []
        for command in cfg.get(key, []):
            env, found = _shell_env_and_ray_starts(command)
            for argv in found:
                starts.append(argv)
                if env.get("RAY_AUTH_MODE") != "token":
                    problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
                token = env.get(TOKEN_ENV)
                if token not in mounts:
                    problems.append(f"{key}: {TOKEN_ENV}={token!r} is not a token file synced by file_mounts")
                host = _flag(argv, "dashboard-host")
                if "--head" in argv and (host is None or host in OPEN_HOSTS):
                    problems.append(
                        f"{key}: dashboard host {host!r} (Ray's default 127.0.0.1 must be explicit; "
                        "0.0.0.0 / :: open the job API)"
                    )
        if not starts:
            problems.append(f"{key}: no `ray start` command")
    return problems


def _containers(job: dict) -> dict[str, tuple[dict, dict]]:
    """name -> (container, pod spec) for the head, every worker group and the job submitter."""
    spec = job["spec"]
    pods = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]}
    for group in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        pods[f"worker group {group['groupName']}"] = group["template"]["spec"]
    pods["submitter"] = spec.get("submitterPodTemplate", {}).get("spec", {"containers": []})
    out = {}
    for where, pod in pods.items():
        for c in pod["containers"] or [{}]:
            out[f"{where}: {c.get('name', 'no container')}"] = (c, pod)
    return out


def _secret_token(container: dict, pod: dict) -> str | None:
    """The Secret the container's Ray token comes from (env secretKeyRef, or a file in a mounted Secret)."""
    env = {e["name"]: e for e in container.get("env", [])}
    if "RAY_AUTH_TOKEN" in env:
        return env["RAY_AUTH_TOKEN"].get("valueFrom", {}).get("secretKeyRef", {}).get("name")
    path = env.get(TOKEN_ENV, {}).get("value")
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for mount in container.get("volumeMounts", []):
        if path and mount["name"] in secrets and path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return secrets[mount["name"]]
    return None


def rayjob_problems(job: dict) -> list[str]:
    """What leaves the RayJob's cluster open (empty: nothing)."""
    problems = []
    cluster = job["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append(f"rayClusterSpec.authOptions {auth!r}: needs mode token and the token's secretName")
    host = cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host")
    if host is None or host in OPEN_HOSTS:  # absent: KubeRay passes --dashboard-host=0.0.0.0
        problems.append(f"head rayStartParams dashboard-host {host!r} opens the job API on every address")
    for where, (container, pod) in _containers(job).items():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{where}: no RAY_AUTH_MODE=token")
        secret = _secret_token(container, pod)
        if secret is None or secret != auth.get("secretName"):
            problems.append(
                f"{where}: the Ray token does not come from the Secret {auth.get('secretName')!r} (got {secret!r})"
            )
    return problems


def test_launcher_config_requires_token_auth_and_a_private_dashboard():
    assert launcher_problems(_load("ray-cluster.yaml")) == []


def test_rayjob_requires_token_auth_from_a_secret_and_a_private_dashboard():
    assert rayjob_problems(_load("rayjob.yaml")) == []


def test_the_checks_catch_an_open_cluster():
    """Each fix undone in a copy of the shipped configs is reported (the checks are not vacuous)."""
    cfg = _load("ray-cluster.yaml")
    cfg["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0").replace(
            "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"
        )
        for c in cfg["head_start_ray_commands"]
    ]
    cfg["file_mounts"] = {"/home/ubuntu/atlasvid-dist": "."}
    found = " | ".join(launcher_problems(cfg))
    assert "dashboard host '0.0.0.0'" in found and "RAY_AUTH_MODE=token" in found and "file_mounts" in found, found

    job = _load("rayjob.yaml")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParams"].pop("dashboard-host")
    head["template"]["spec"]["containers"][0]["env"] = []
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"] = []
    found = " | ".join(rayjob_problems(job))
    assert "dashboard-host None" in found and "head: ray-head: no RAY_AUTH_MODE=token" in found, found
    assert "worker group h100x8: ray-worker: the Ray token does not come from the Secret" in found, found


def test_docs_and_scripts_never_advise_disabling_auth():
    for path in [
        CLUSTER / "README.md",
        CLUSTER / "submit_job.py",
        CLUSTER / "ray-cluster.yaml",
        CLUSTER / "rayjob.yaml",
        ROOT / "README.md",
    ]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", text), path
        assert "--dashboard-host 0.0.0.0" not in text and "--dashboard-host=0.0.0.0" not in text, path
