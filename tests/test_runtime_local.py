"""A one-machine run stays on loopback (the detail group's rendezvous, gloo's pairs) and embedded Ray's start is
retried once; no Ray needed here (runtime/local.py)."""

import logging
import multiprocessing as mp
import os
import socket
import stat

import pytest

from atlasvid_dist.errors import RunFailure
from atlasvid_dist.runtime.local import init_with_retry, is_loopback, remove_store, rendezvous


def test_an_embedded_runs_rendezvous_is_loopback_and_a_private_file_store(tmp_path):
    """Even when Ray reports the LAN address, a run whose ranks are all on this machine rendezvous on 127.0.0.1."""
    host, init = rendezvous("192.0.2.2", local=True, folder=str(tmp_path))
    assert host == "127.0.0.1"
    assert init.startswith("file://") and init.endswith("/store")
    folder = os.path.dirname(init[len("file://") :])
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    remove_store(init)
    assert not os.path.exists(folder)
    assert rendezvous("127.0.0.1", local=False, folder=str(tmp_path))[0] == "127.0.0.1"


def test_a_cluster_runs_rendezvous_is_the_nodes_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the source address of a route out (sends nothing)
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
    if is_loopback(ip):
        pytest.skip("this machine has no route off loopback: no LAN address to test with")
    host, init = rendezvous(ip, local=False)
    assert host == ip and init.startswith(f"tcp://{ip}:")


def _join(rank: int, init: str, out) -> None:
    """One rank: join a 2-rank gloo group as the detail workers do and report its listening addresses."""
    import psutil
    import torch.distributed as dist

    from atlasvid_dist.parallel import comm

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # what DetailWorker.run sets for a loopback host
    comm.init_group("gloo", rank, 2, init, timeout_s=600)
    listening = sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN"})
    dist.barrier()  # both ranks have looked before either leaves
    comm.teardown()
    out.put((rank, listening))


def test_a_local_gloo_group_listens_on_loopback_only(tmp_path):
    """Nothing of the rendezvous or of gloo's connections listens on a non-loopback address (torch's TCP store
    would listen on every interface, whatever host it is given)."""
    _, init = rendezvous("192.0.2.2", local=True, folder=str(tmp_path))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_join, args=(r, init, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=600) for _ in procs)  # a deadline against a hang, not a speed limit
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, addresses in got.items():
        assert addresses and all(is_loopback(a) for a in addresses), (rank, addresses)


def test_ray_start_is_retried_once_and_the_first_error_is_logged(caplog):
    calls, cleaned = [], []

    def init():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("GCS did not answer")
        return "ctx"

    with caplog.at_level(logging.WARNING, logger="atlasvid_dist.runtime"):
        assert init_with_retry(init, cleanup=lambda: cleaned.append(1)) == "ctx"
    assert len(calls) == 2 and cleaned == [1]
    assert "embedded Ray failed to start (ConnectionError: GCS did not answer); retrying once" in caplog.text


def test_ray_start_failing_twice_is_a_run_failure_naming_both_errors():
    errors = iter([ConnectionError("GCS did not answer"), TimeoutError("raylet did not register")])

    def init():
        raise next(errors)

    with pytest.raises(RunFailure) as e:
        init_with_retry(init)
    msg = str(e.value)
    assert "failed to start twice" in msg and "GCS did not answer" in msg and "raylet did not register" in msg
    assert e.value.exit_code == 1


def test_ray_started_at_once_is_not_retried():
    calls = []
    assert init_with_retry(lambda: calls.append(1) or "ctx", cleanup=lambda: calls.append("cleanup")) == "ctx"
    assert calls == [1]


def test_a_run_without_an_address_is_embedded(monkeypatch):
    from atlasvid_dist.runtime.local import embedded

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert embedded(None) and not embedded("auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a Ray job's driver
    assert not embedded(None)
