"""Run a function on N local gloo processes (spawned), for tests of the distributed code on CPU (or NCCL on GPUs).

    results = run_ranks(fn, 3, arg1, arg2, timeout=60)

``fn(rank, world_size, *args)`` must be importable (a module-level function of a test module) and should return
something small and picklable (numbers, strings, lists); do the tensor comparisons inside ``fn``. Every rank joins
a gloo group on a free loopback port (``atlasvid_dist.parallel.comm.init_group``) before ``fn`` runs and leaves it
after. An exception in any rank fails the caller with that rank's traceback; ranks that do not finish within
``timeout`` seconds are killed and reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, pg_timeout: float, backend: str, results, args) -> None:
    import torch

    from atlasvid_dist.parallel import comm

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        comm.init_group(backend, rank, world, f"tcp://127.0.0.1:{port}", timeout_s=pg_timeout)
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
        _linger()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            comm.teardown()
        except Exception:  # noqa: BLE001 - a broken group after a failure; the result is already sent
            pass


def _linger() -> None:
    """Rank 0 hosts the rendezvous store: no rank leaves while another may still use it (a sub-group's creation,
    say), whatever the load on the machine. Best effort: a test that broke the group on purpose has its result."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - the result is already sent
        pass


def run_ranks(
    fn, world_size: int, *args, timeout: float = 60.0, pg_timeout: float = 30.0, backend: str = "gloo"
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    ``backend="nccl"`` puts rank r on GPU ``r % device_count`` (NCCL refuses two ranks on one GPU).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, pg_timeout, backend, results, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    missing = [r for r in range(world_size) if r not in out]
    if missing:
        raise AssertionError(
            f"ranks {missing} did not finish within {timeout:g} s (exit codes {[procs[r].exitcode for r in missing]})"
        )
    return [out[r] for r in range(world_size)]
