"""The lent GPU's session in one call: the GPU measurements of issue 14, run one after another inside a budget.

A GPU is lent to a work session only sometimes, for 15 minutes of device time in all (starts included), and the
machine has torch but neither Ray, diffusers nor DeepSpeed. This script is what such a session runs, once, with
time left for one rerun:

    python benchmarks/gpu_session.py [--budget 450] [--wheels wheels/] [--out benchmarks/results]
    python benchmarks/gpu_session.py --dry-run      # the steps and their estimates; runs nothing, needs no GPU

``--wheels DIR``: wheels carried to the machine (``pip download diffusers==0.42.1 importlib_metadata zipp
--no-deps -d wheels/`` beforehand, 6.4 MB; diffusers also imports Pillow and requests, which a machine with
transformers usually has; ``wheels/`` is git-ignored, so name it in the device call's carry), installed
with ``--no-deps --no-index`` when diffusers is missing; the steps that need diffusers are skipped otherwise, and
say so.

Steps (each a subprocess of this interpreter, with its own time limit; a step whose estimate exceeds the budget
left is skipped and marked so, so the budget is never overrun by more than one step's overrun):

* ``attention-4k``: one layer of Wan2.1-1.3B shapes at 4K x 81, full vs atlas (torch only);
* ``attention-4k-shifted``: the shifted atlas layer (its cut windows at their real lengths);
* ``step-1.3b-4k``: one denoising step, 720P and 4K full (4K extrapolated from one block) vs 4K atlas, with the
  profiler table of the atlas forward (top kernels by time) and its split into GEMM / attention / the rest;
* ``calibrate``: measured peaks (``max_memory_allocated``) next to the memory model's for a VAE tile and a 1.3B
  2K x 81 atlas forward: the cases the model's constants were fitted on, so a check that they still hold after
  the changes since, not the issue's check on unfitted cases (those do not fit in the budget with the rest);
* ``step-1.3b-4k-compiled``: the 4K forwards again with ``--compile-blocks`` (last: the first to be skipped when
  the budget is short; its estimate is a guess, compile times at this size were never measured).

Writes ``gpu-session-<device>.json`` into ``--out``: the environment (device, torch, commit, command) and per step
its command, exit code, seconds, the result files it wrote and the tail of its output. The end-to-end 4K job is
not a step: Wan's text encoder (UMT5-XXL) and a 4K x 81 decode do not fit in the budget with the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, environment  # noqa: E402


@dataclass(frozen=True)
class Step:
    """One measurement: a command run with this interpreter, its expected seconds and what it needs."""

    name: str
    argv: tuple[str, ...]
    """Arguments after the interpreter (a script path or ``-m module``); ``{out}`` is the results folder."""
    estimate_s: float
    """Expected wall time on an H100/H200 (the budget check uses it; the limit is 3x it)."""
    needs_diffusers: bool = False


_ON_GPU = ("--device", "cuda", "--dtype", "bf16", "--out", "{out}")
_ATTENTION = ("benchmarks/bench_attention.py", "--preset", "wan-4k", *_ON_GPU)
_STEP = ("benchmarks/bench_step.py", "--model", "wan2.1-1.3b", "--iters", "2", *_ON_GPU)

STEPS: tuple[Step, ...] = (
    Step("attention-4k", _ATTENTION, 60),
    Step("attention-4k-shifted", (*_ATTENTION, "--shifted", "--skip-full"), 30),
    Step("step-1.3b-4k", _STEP, 150, needs_diffusers=True),
    Step("calibrate", ("-m", "atlasvid_dist.cost.calibrate", "--skip-14b", "--out", "{out}"), 90, True),
    Step("step-1.3b-4k-compiled", (*_STEP, "--compile-blocks"), 180, needs_diffusers=True),
)


@dataclass
class StepResult:
    name: str
    command: list[str]
    status: str
    """'ok', 'failed', 'timed out', 'skipped: ...' or 'planned' (dry run)."""
    returncode: int | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    output_tail: str = ""


def install_wheels(folder: Path) -> dict[str, str]:
    """pip install each carried wheel (no index, no dependencies; one at a time, so a wheel built for another
    Python does not stop the others); wheel name -> 'installed' or pip's last line."""
    out = {}
    for wheel in sorted(folder.glob("*.whl")):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        said = (done.stdout + done.stderr).strip().splitlines()
        out[wheel.name] = "installed" if done.returncode == 0 else (said[-1] if said else f"exit {done.returncode}")
    return out or {str(folder): "no wheels"}


def run_steps(steps, budget_s: float, out: Path, dry_run: bool, have_diffusers: bool, cwd: Path) -> list[dict]:
    """Run ``steps`` in order inside ``budget_s`` seconds (see the module docstring); one dict per step."""
    results, start, planned = [], time.monotonic(), 0.0
    for step in steps:
        cmd = [sys.executable, *(a.replace("{out}", str(out)) for a in step.argv)]
        res = StepResult(step.name, cmd, "planned")
        left = budget_s - (planned if dry_run else time.monotonic() - start)  # a dry run spends the estimates
        if step.needs_diffusers and not have_diffusers:
            res.status = "skipped: needs diffusers (carry its wheel: --wheels)"
        elif step.estimate_s > left:
            res.status = f"skipped: estimated {step.estimate_s:.0f} s > {max(left, 0):.0f} s of budget left"
        elif dry_run:
            planned += step.estimate_s
        else:
            res = _run(step, cmd, min(left, 3 * step.estimate_s), out, cwd)
        results.append(asdict(res))
        print(f"{step.name}: {res.status} ({res.seconds:.0f} s)", flush=True)
    return results


def _run(step: Step, cmd: list[str], limit: float, out: Path, cwd: Path) -> StepResult:
    before = {p: p.stat().st_mtime for p in out.glob("*")} if out.exists() else {}
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=cwd)
        status = "ok" if done.returncode == 0 else "failed"
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status, rc = "timed out", None
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    files = sorted(str(p.name) for p in out.glob("*") if before.get(p) != p.stat().st_mtime) if out.exists() else []
    return StepResult(step.name, cmd, status, rc, round(time.monotonic() - t0, 1), files, text[-4000:])


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all steps (default 450: 7.5 min)")
    p.add_argument("--wheels", default=None, help="folder of carried wheels to install when diffusers is missing")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    p.add_argument("--only", default=None, help="comma list of step names (default: all)")
    p.add_argument("--dry-run", action="store_true", help="list the steps and their estimates; run nothing")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget: {args.budget} must be > 0 seconds")
    names = {s.name for s in STEPS}
    if args.only and not set(args.only.split(",")) <= names:
        p.error(f"--only: {args.only!r} names no step; steps are {', '.join(sorted(names))}")
    return args


def main(argv=None) -> int:
    import torch

    args = parse(argv)
    out = Path(args.out)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device: this script is for the lent GPU (--dry-run lists its steps)", file=sys.stderr)
        return 2
    wheels = install_wheels(Path(args.wheels)) if args.wheels and not _has("diffusers") else None
    steps = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run_steps(steps, args.budget, out, args.dry_run, _has("diffusers"), HERE.parent)
    payload = {"benchmark": "gpu_session", "budget_s": args.budget, "dry_run": args.dry_run, "steps": results}
    payload["wheels"] = wheels
    payload["environment"] = environment(device)
    name = "gpu-session-dry-run" if args.dry_run else f"gpu-session-{payload['environment']['device_name']}"
    path = out / (name.replace(" ", "-").lower() + ".json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print("saved", path)
    return 0 if all(r["status"] in ("ok", "planned") or r["status"].startswith("skipped") for r in results) else 1


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
