"""Shared benchmark plumbing: environment facts and JSON results (device, versions, commit, command)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment(device: str) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "command": " ".join([sys.executable] + sys.argv),
        "commit": _commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _commit() -> str:
    env = os.environ.get("ATLASVID_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            # results written by earlier benchmark runs of the same session do not change the code measured
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/benchmarks/results"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn, device: str, warmup: int = 1, iters: int = 3) -> float:
    """Median seconds of ``fn()`` after warm-up (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def save(name: str, payload: dict, out_dir: str | None = None) -> Path:
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
