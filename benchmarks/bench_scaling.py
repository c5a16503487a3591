"""Distributed scaling on CPU: the same tiny-model generation on 1, 2 and 4 detail workers (Ray, gloo).

Per worker count: median seconds of one stage-2 step on each rank (the slowest rank sets the pace), bytes every
rank sent per step (measured, cond + uncond passes), the cost model's bytes received per step for the same plan
(one cost model: ``atlasvid_dist.cost``), tokens per rank, and parallel efficiency = t(1) / (N x t(N)). Also the
same run with ``--no-shift``: unshifted windows never leave their rank, so every rank sends 0 bytes.

    python benchmarks/bench_scaling.py [--workers 1 2 4] [--res 1024x1024] [--frames 9] [--steps 3]

Honest limits: the tiny model's compute per token is small, so fixed costs (Python, gloo messages) weigh more
than on a GPU; and on a machine with fewer cores than workers the workers share cores, so efficiency above the
core count measures oversubscription, not the method. The JSON records the core count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--res", default="1024x1024")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--window", default="3,8,8")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args()


def config(args, out_dir: str, shift: bool):
    from atlasvid_dist.cli.generate import DEFAULTS, build_config

    return build_config(
        {
            **DEFAULTS,
            "prompt": "a red ball rolling",
            "res": args.res,
            "frames": args.frames,
            "steps": args.steps,
            "proxy_steps": 2,
            "window": args.window,
            "spatial_scale": 2,
            "guidance": 3.0,
            "shift": shift,
            "out": os.path.join(out_dir, "scaling.mp4"),
        }
    )


def predicted_bytes(cfg, workers: int) -> int:
    """The cost model's bytes one rank receives per detail step (halo; all passes)."""
    from atlasvid_dist.config.model import model_preset
    from atlasvid_dist.config.parallel import ParallelPlan
    from atlasvid_dist.cost.model import RunSettings, estimate

    plan = ParallelPlan(workers=workers, device="cpu")
    run = RunSettings(dtype="fp32", steps=cfg.steps, proxy_steps=cfg.proxy_steps, guidance=cfg.guidance)
    report = estimate(cfg.video, model_preset("tiny"), cfg.method, plan, run, "cpu", suggest=False)
    return int(report.comm_bytes_per_step_per_rank["total"])


def run_one(cfg, workers: int) -> dict:
    from atlasvid_dist.runtime.driver import DistributedGenerator

    res = DistributedGenerator(cfg, workers, progress=False).run()
    step = max(res.step_seconds)
    return {
        "workers": workers,
        "seconds_per_step_by_rank": res.step_seconds,
        "seconds_per_step": step,
        "bytes_sent_per_step_by_rank": res.bytes_per_step,
        "tokens_per_rank": res.tokens,
        "predicted_bytes_received_per_step_per_rank": predicted_bytes(cfg, workers),
        "decode_tiles_per_rank": res.tiles,
        "seconds": res.result.seconds,
    }


def main() -> int:
    import ray

    args = parse()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=max(args.workers),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=False,
    )
    rows, unshifted = [], None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config(args, tmp, shift=True)
            for n in args.workers:
                rows.append(run_one(cfg, n))
                print(
                    f"{n} worker(s): {rows[-1]['seconds_per_step']:.3f} s/step, bytes/step sent "
                    f"{rows[-1]['bytes_sent_per_step_by_rank']}, predicted received "
                    f"{rows[-1]['predicted_bytes_received_per_step_per_rank']}",
                    flush=True,
                )
            unshifted = run_one(replace(cfg, method=replace(cfg.method, shift=False)), max(args.workers))
    finally:
        ray.shutdown()
    base = next((r["seconds_per_step"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["speedup"] = None if base is None else base / r["seconds_per_step"]
        r["parallel_efficiency"] = None if base is None else base / (r["workers"] * r["seconds_per_step"])
    print(f"{'workers':>7} {'s/step':>8} {'speedup':>8} {'efficiency':>10} {'MB sent/step/rank (max)':>24}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['seconds_per_step']:>8.3f} {r['speedup'] or 0:>8.2f} "
            f"{r['parallel_efficiency'] or 0:>10.2f} {max(r['bytes_sent_per_step_by_rank']) / 1e6:>24.3f}"
        )
    print(f"--no-shift, {unshifted['workers']} workers: bytes sent per step {unshifted['bytes_sent_per_step_by_rank']}")
    payload = {
        "benchmark": "scaling-cpu",
        "env": environment("cpu"),
        "geometry": {
            "res": args.res,
            "frames": args.frames,
            "steps": args.steps,
            "window": args.window,
            "model": "tiny",
        },
        "note": (
            f"{os.cpu_count()} CPU cores for up to {max(args.workers)} workers (each torch thread 1): "
            "above the core count workers share cores; the tiny model's per-token compute is small "
            "so fixed per-step costs weigh more than on GPUs."
        ),
        "rows": rows,
        "unshifted": unshifted,
    }
    path = save("scaling-cpu", payload, args.out)
    print(f"saved {path} and {plot(rows, path.with_suffix('.png'))}")
    return 0


def plot(rows: list[dict], path: Path) -> Path:
    """Seconds per step and bytes sent per rank against the worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["workers"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(n, [r["seconds_per_step"] for r in rows], "o-", label="measured (slowest rank)")
    a.plot(n, [rows[0]["seconds_per_step"] / k for k in n], "--", color="grey", label="ideal")
    a.set(xlabel="detail workers (CPU processes)", ylabel="s / stage-2 step", xticks=n, title="step time")
    a.legend()
    b.bar(
        [k - 0.15 for k in n],
        [max(r["bytes_sent_per_step_by_rank"]) / 1e6 for r in rows],
        0.3,
        label="measured, sent (max rank)",
    )
    b.bar(
        [k + 0.15 for k in n],
        [r["predicted_bytes_received_per_step_per_rank"] / 1e6 for r in rows],
        0.3,
        label="cost model, received",
    )
    b.set(xlabel="detail workers", ylabel="MB / step / rank", xticks=n, title="halo traffic")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
