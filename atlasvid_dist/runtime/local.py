"""Keeping a one-machine run on loopback, and starting embedded Ray reliably (docs/security.md says what listens where).

* :func:`loopback_ray_env` — before ``import ray``: Ray 2.60 replaces ``_node_ip_address='127.0.0.1'`` with the
  machine's LAN address (``services.resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
  which makes it keep loopback; its gRPC servers then listen on 127.0.0.1 too. Read once, when ray is imported.
* :func:`init_with_retry` — embedded Ray occasionally fails to start on a loaded machine: one retry, then RunFailure.
* :func:`rendezvous` — the detail group's rendezvous: a file store in a private folder (no listening socket at all)
  when every rank is on this machine, a TCP store on the node's address otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import TypeVar

from ..errors import RunFailure

LOOPBACK = "127.0.0.1"
#: Ray reads this when it is imported; "0" keeps the node address it is given (127.0.0.1) instead of the LAN one
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

T = TypeVar("T")
log = logging.getLogger("atlasvid_dist.runtime")


def is_loopback(ip: str) -> bool:
    """True for an IPv4 loopback address (127.0.0.0/8) or ::1."""
    return ip.startswith("127.") or ip in ("::1", "localhost")


def embedded(ray_address: str | None) -> bool:
    """True when a run starts (or finds) Ray on this machine only: no address given and no RAY_ADDRESS (which
    `ray job submit` sets for a job's driver)."""
    return not (ray_address or os.environ.get("RAY_ADDRESS"))


def loopback_ray_env() -> bool:
    """Make the Ray imported next keep 127.0.0.1 as its node address; False when ray was imported already (too
    late: the caller's Ray keeps its own setting)."""
    if "ray" in sys.modules:
        return os.environ.get(RAY_LOOPBACK_ENV) == "0"
    os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    return os.environ[RAY_LOOPBACK_ENV] == "0"


def init_with_retry(
    init: Callable[[], T],
    cleanup: Callable[[], None] = lambda: None,
    what: str = "embedded Ray",
    logger: logging.Logger = log,
) -> T:
    """``init()``; when it raises, log the first error, ``cleanup()`` (a half-started Ray) and call it once more. A
    second failure is a RunFailure naming both errors."""
    try:
        return init()
    except Exception as first:  # noqa: BLE001 - any start failure is retried once
        logger.warning("%s failed to start (%s: %s); retrying once", what, type(first).__name__, first)
        cleanup()
        try:
            return init()
        except Exception as second:  # noqa: BLE001
            raise RunFailure(
                f"{what} failed to start twice: first {type(first).__name__}: {first}; then "
                f"{type(second).__name__}: {second}"
            ) from second


def rendezvous(node_ip: str, local: bool, folder: str | None = None) -> tuple[str, str]:
    """(host, init_method) of a detail group's rendezvous, chosen on rank 0's node.

    ``local`` (every rank on this machine: an embedded Ray, or a one-node cluster): host 127.0.0.1 (gloo's pairs
    then use the ``lo`` interface) and a file store in a new mode-700 folder under ``folder`` (the system temp
    directory by default), because torch's TCP store listens on every interface whatever host it is given and has
    no authentication. Otherwise: the node's address and a free port there (a TCP store; keep that network private).
    """
    if local or is_loopback(node_ip):
        store = tempfile.mkdtemp(prefix="atlasvid-rdzv-", dir=folder)  # mode 700: only this user opens it
        return LOOPBACK, f"file://{os.path.join(store, 'store')}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((node_ip, 0))
        return node_ip, f"tcp://{node_ip}:{s.getsockname()[1]}"


def remove_store(init_method: str) -> None:
    """Delete the folder of a file-store rendezvous (a TCP one leaves nothing behind); safe to call twice."""
    if init_method.startswith("file://"):
        import shutil

        shutil.rmtree(os.path.dirname(init_method[len("file://") :]), ignore_errors=True)
