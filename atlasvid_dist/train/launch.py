"""Child processes that die with their parent: the torchrun launcher of `atlasvid-dist train` and its ranks.

A SIGTERM or SIGINT of the command is forwarded to the launcher's process group (torchrun then stops its ranks
gracefully); a SIGKILLed command cannot forward anything, so the launcher also gets a parent-death signal
(Linux ``prctl(PR_SET_PDEATHSIG)``), and each rank sets one towards torchrun when it starts
(:func:`die_with_parent`), so no rank outlives the command and races a following ``--resume``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
"""prctl option (linux/prctl.h): the signal this process gets when the thread that created it exits."""
GRACE_S = 60.0
"""Seconds the launcher has to stop after a forwarded SIGTERM/SIGINT before its process group is SIGKILLed."""
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; exit now if the parent (``parent``, else
    the parent seen on entry) is already gone.

    Returns False where prctl is unavailable (not Linux): the caller then relies on signal forwarding only."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(128 + int(sig))
    return True


def _preexec_for(parent: int):
    """The launcher's preexec_fn: after fork, die with ``parent`` (SIGTERM, so torchrun still stops its ranks)."""
    return lambda: die_with_parent(signal.SIGTERM, parent)


def run_launcher(cmd: list[str], env: dict, grace_s: float = GRACE_S) -> int:
    """Run ``cmd`` in a session of its own until it exits and return its exit status.

    SIGTERM/SIGINT received meanwhile are forwarded to its process group; if it has not exited ``grace_s``
    seconds after that, the group is SIGKILLed. Any exception while waiting also SIGKILLs the group."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        preexec_fn=_preexec_for(os.getpid()) if sys.platform.startswith("linux") else None,
    )
    forwarded_at: list[float] = []

    def forward(signum, _frame) -> None:
        _signal_group(proc.pid, signum)
        forwarded_at.append(time.monotonic())

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return _wait(proc, forwarded_at, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception (or a grace expiry) while it still runs
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(proc: subprocess.Popen, forwarded_at: list[float], grace_s: float) -> int:
    """Wait for ``proc``; SIGKILL its group ``grace_s`` after the first forwarded signal."""
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if forwarded_at and time.monotonic() - forwarded_at[0] > grace_s:
                _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; nothing when it is already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_name(returncode: int) -> str | None:
    """'SIGTERM' for a status that means death by a signal (negative, or 128 + n as torchrun reports), else None."""
    n = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return signal.Signals(n).name if n else None
    except ValueError:
        return None
