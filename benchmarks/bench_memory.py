"""The memory model against measured per-rank peaks on CPU: `generate --workers N` with the tiny model.

Each case runs the real command (embedded Ray, gloo) with ``--json``; every rank reports its process's peak RSS
(``getrusage``) and the run reports the pre-flight's memory of the heaviest rank by phase (the cost model, the
figure ``plan`` prints). A rank's process also holds what the model does not count and does not grow with the
video (the interpreter, torch, Ray, the libraries' code), so both sides are taken relative to the smallest case:

    measured growth = peak RSS of the heaviest rank - the same in the smallest case
    modelled growth = the pre-flight's peak over the phases a detail rank runs - the same in the smallest case

at two points: the end of each rank's detail stage (against the proxy_cache and detail_stage phases) and the
whole run (the decode phase too); the ratio measured / modelled is printed and saved per case and point. None of these cases was used to fit the cost
model's constants (they come from H100 runs of Wan2.1-1.3B and 14B, ``cost/model.py``).

    python benchmarks/bench_memory.py [--workers 2] [--cases 128x128x9 512x512x33 1024x1024x33 ...]
        [--host-mmap-threshold 131072]

With glibc's default allocator settings a rank's peak RSS also holds freed tensors the heap kept (its mmap
threshold rises as large blocks are freed); ``--host-mmap-threshold`` runs the cases with generate's setting that
fixes it, so freed tensors go back to the system.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save  # noqa: E402

RANK_PHASES = ("proxy_cache", "detail_stage", "decode")
"""The phases a detail rank of the Ray runtime runs (the proxy actor encodes the text and runs stage 1)."""
POINTS = {"detail": ("measured_detail_rss_by_rank", RANK_PHASES[:2]), "run": ("measured_peak_rss_by_rank", RANK_PHASES)}
"""The two peaks each rank reports, and the phases whose modelled peak each stands against: at the end of its
detail stage (before the decode) and over the whole run (the decode included)."""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--cases", nargs="+", default=["128x128x9", "512x512x33", "1024x1024x33", "1024x1024x45", "1536x1536x21"]
    )
    p.add_argument("--window", default="3,4,4", help="the same window in every case (the smallest needs it)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument(
        "--host-mmap-threshold",
        type=int,
        default=0,
        help="generate's --host-mmap-threshold (0: glibc's dynamic default); results saved as memory-cpu-tiny-mmap",
    )
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args()


def run_case(case: str, args, folder: str) -> dict:
    w, h, f = case.split("x")
    cmd = [sys.executable, "-m", "atlasvid_dist.cli.main", "generate", "--model", "tiny", "--prompt", "a test"]
    cmd += ["--res", f"{w}x{h}", "--frames", f, "--workers", str(args.workers), "--window", args.window]
    cmd += ["--steps", str(args.steps), "--proxy-steps", str(args.steps), "--quiet", "--json"]
    cmd += ["--out", os.path.join(folder, f"{case}.mp4"), "--host-mmap-threshold", str(args.host_mmap_threshold)]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{case}: exit {done.returncode}\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    phases = summary["planned_memory_by_phase"]
    return {
        "case": case,
        "measured_peak_rss_by_rank": [p["cpu_max_rss_bytes"] for p in summary["peak_memory"]],
        "measured_detail_rss_by_rank": [p["detail_stage"]["cpu_max_rss_bytes"] for p in summary["peak_memory"]],
        "planned_by_phase": phases,
        **{f"planned_{point}_peak": max(phases[k] for k in ks if k in phases) for point, (_, ks) in POINTS.items()},
        "wall_seconds": summary["wall_seconds"],
    }


def main() -> None:
    args = parse()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            rows.append(run_case(case, args, folder))
            print(f"{case}: done", flush=True)
    base = rows[0]
    print(f"\nworkers {args.workers}, tiny model, window {args.window}; growth over {base['case']} (MiB)")
    print(f"{'case':>14} {'peak':>7} {'measured':>10} {'modelled':>10} {'ratio':>7}")
    for r in rows[1:]:
        for point, (measured, _) in POINTS.items():
            grown = max(r[measured]) - max(base[measured])
            modelled = r[f"planned_{point}_peak"] - base[f"planned_{point}_peak"]
            r[point] = {"measured_growth": grown, "modelled_growth": modelled, "ratio": grown / modelled}
            mib = 2**20
            print(f"{r['case']:>14} {point:>7} {grown / mib:10.1f} {modelled / mib:10.1f} {grown / modelled:7.2f}")
    payload = {
        "environment": environment("cpu"),
        "workers": args.workers,
        "window": args.window,
        "host_mmap_threshold": args.host_mmap_threshold,
        "cases": rows,
    }
    name = "memory-cpu-tiny-mmap" if args.host_mmap_threshold else "memory-cpu-tiny"
    print("saved", save(name, payload, args.out))


if __name__ == "__main__":
    main()
