"""The memory model against live tensor bytes of the detail stage on CPU: one process and each rank of N (gloo).

Each case builds the tiny model's run, makes its proxy, then measures the detail stage under
``models.memory.LiveStorages`` (bytes of tensor storages alive at once: what CUDA's ``max_memory_allocated`` is
on a GPU; the host allocator's cache and oneDNN's copies, which RSS holds besides, are ``bench_memory.py``'s).
The modelled figure is the cost model's detail phase without the weights (what the stage allocates), for the
sharding the ranks run (time slabs, a key/value halo). No constant of the model was fitted on these cases.

    python benchmarks/bench_memory_live.py [--workers 2] [--cases 512x512x33 1024x1024x33 ...] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save  # noqa: E402

RESIDENT = ("weights", "text_encoder_weights", "vae_weights", "total")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=["512x512x33", "1024x1024x33", "1024x1024x45", "1536x1536x21"])
    p.add_argument("--window", default="3,4,4")
    p.add_argument("--steps", type=int, default=3, help="3 or more: the sampler's steady state")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args()


def generator(case: str, args, folder: str):
    from atlasvid_dist.cli.generate import build_config
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    w, h, f = case.split("x")
    values = dict(model="tiny", prompt="a test", res=f"{w}x{h}", frames=int(f), window=args.window)
    values.update(steps=args.steps, proxy_steps=1, out=os.path.join(folder, "o.mp4"))
    return TwoStageGenerator(build_config(values), progress=False)


def inputs(gen):
    comp = gen.load()
    text = gen.encode(comp)
    with torch.no_grad():
        return comp, text, gen.stage1(comp, text, None, None)


def modelled(gen, workers: int) -> dict:
    from atlasvid_dist.config.parallel import ParallelPlan

    plan = ParallelPlan(workers=workers, device="cpu", window_order="thw", shift_exchange="kv")
    return gen.preflight(workers=workers, plan=plan).memory["detail_stage"]


def one_process(case: str, args, folder: str) -> int:
    from atlasvid_dist.models.memory import LiveStorages

    gen = generator(case, args, folder)
    comp, text, proxy = inputs(gen)
    with torch.no_grad(), LiveStorages() as live:
        gen.stage2(comp, text, proxy, None, None)
    return live.peak


def rank_entry(rank: int, world: int, port: int, case: str, args, folder: str, results) -> None:
    from atlasvid_dist.models.memory import LiveStorages
    from atlasvid_dist.parallel import comm
    from atlasvid_dist.runtime.detail import denoise_rank

    torch.set_num_threads(1)
    comm.init_group("gloo", rank, world, f"tcp://127.0.0.1:{port}", timeout_s=120)
    try:
        gen = generator(case, args, folder)
        comp, text, proxy = inputs(gen)
        with torch.no_grad(), LiveStorages() as live:
            denoise_rank(gen, comp, text, proxy, rank, world, dist.group.WORLD, window_order="thw")
        results.put((rank, live.peak))
    finally:
        comm.teardown()


def ranks(case: str, args, folder: str) -> list[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_entry, (args.workers, port, case, args, folder, results), nprocs=args.workers)
    peaks = dict(results.get() for _ in range(args.workers))
    return [peaks[r] for r in range(args.workers)]


def row(case: str, args, folder: str) -> dict:
    gen = generator(case, args, folder)
    out = {"case": case}
    for name, workers, measure in (("one_process", 1, one_process), ("ranks", args.workers, ranks)):
        phase = modelled(gen, workers)
        model = sum(v for k, v in phase.items() if k not in RESIDENT)
        peaks = measure(case, args, folder)
        peak = max(peaks) if isinstance(peaks, list) else peaks
        out[name] = {"measured_bytes": peaks, "modelled_bytes": model, "modelled_parts": phase, "ratio": peak / model}
    return out


def main() -> None:
    args = parse()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rows = []
    mib = 2**20
    print(f"tiny model, window {args.window}, {args.steps} steps; detail stage, live tensors (MiB)")
    print(f"{'case':>14} {'where':>12} {'measured':>10} {'modelled':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases:
            r = row(case, args, folder)
            rows.append(r)
            for where in ("one_process", "ranks"):
                m = r[where]
                peak = max(m["measured_bytes"]) if where == "ranks" else m["measured_bytes"]
                label = where if where == "one_process" else f"{args.workers} ranks"
                line = f"{case:>14} {label:>12} {peak / mib:10.2f} {m['modelled_bytes'] / mib:10.2f}"
                print(f"{line} {m['ratio']:7.3f}", flush=True)
    payload = {"environment": environment("cpu"), "workers": args.workers, "window": args.window, "cases": rows}
    print("saved", save("memory-live-cpu-tiny", payload, args.out))


if __name__ == "__main__":
    main()
