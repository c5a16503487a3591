"""Process groups, the byte counter and timed waits shared by every distributed piece of this layer.

Every send in ``parallel`` goes through :func:`exchange` or :func:`all_to_all`, which count the bytes this rank
sends in a :class:`CommStats` and wait with a timeout: a peer that never answers becomes a :class:`RunFailure`
naming this rank, the peer (when the operation has one) and the caller's ``step`` label, never a silent hang.

The helpers take any ``torch.distributed`` group (gloo on CPU, NCCL on GPU); ``group=None`` means the default group.
Point-to-point traffic is posted with ``batch_isend_irecv`` so that rings do not deadlock on NCCL. CUDA tensors
over a gloo group are staged through CPU memory (gloo moves CPU tensors only).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ConfigError, RunFailure, check

#: seconds a wait may block before it raises RunFailure, unless the caller passes ``timeout``
DEFAULT_TIMEOUT_S = 600.0


# -- process groups ---------------------------------------------------------------------------------------------
def init_group(
    backend: str,
    rank: int,
    world_size: int,
    init_method: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device_id: torch.device | None = None,
) -> dist.ProcessGroup:
    """Join the default process group and wait for every rank (one barrier), with ``timeout_s`` on every operation.

    ``init_method`` defaults to ``env://`` (MASTER_ADDR/MASTER_PORT). The barrier also creates the NCCL
    communicator with every rank present, which ``batch_isend_irecv`` needs before any subset-only traffic.
    A rank that does not join in time raises :class:`RunFailure`.
    """
    check(backend in ("gloo", "nccl"), "backend", backend, "must be 'gloo' (CPU) or 'nccl' (CUDA)")
    check(world_size >= 1, "world_size", world_size, "must be >= 1")
    check(0 <= rank < world_size, "rank", rank, f"must be in [0, world_size = {world_size})")
    check(timeout_s > 0, "timeout_s", timeout_s, "must be > 0")
    if dist.is_initialized():
        raise ConfigError("process group", "initialized", "a default process group already exists in this process")
    kwargs = {"device_id": device_id} if device_id is not None else {}
    try:
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
        if backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
    except (RuntimeError, dist.DistError) as exc:  # the store or the barrier timed out
        where = init_method or f"env://{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise RunFailure(
            f"rank {rank}/{world_size}: could not join the {backend} process group at {where} "
            f"within {timeout_s:g} s: {exc}"
        ) from exc
    return dist.group.WORLD


def teardown() -> None:
    """Destroy the default process group if there is one (safe to call twice, and in ``finally``)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


# -- byte counter -------------------------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes one rank sent, by category (``ring.fwd``, ``halo.bwd``, ...); every send of this layer adds to it."""

    sent: dict[str, int] = field(default_factory=dict)
    """Bytes sent to other ranks, by category (bytes a rank keeps for itself are not counted)."""
    messages: dict[str, int] = field(default_factory=dict)
    """Messages (point-to-point sends, or collectives) posted, by category."""

    def add(self, category: str, nbytes: int, messages: int = 1) -> None:
        self.sent[category] = self.sent.get(category, 0) + int(nbytes)
        self.messages[category] = self.messages.get(category, 0) + int(messages)

    def total(self, prefix: str = "") -> int:
        """Bytes sent in every category that starts with ``prefix``."""
        return sum(n for c, n in self.sent.items() if c.startswith(prefix))

    def reset(self) -> None:
        self.sent.clear()
        self.messages.clear()


def gather_stats(stats: CommStats, group: dist.ProcessGroup | None = None) -> list[dict[str, int]]:
    """Every rank's ``sent`` dictionary, indexed by group rank (a collective: call it on every rank)."""
    out: list[dict[str, int] | None] = [None] * group_size(group)
    dist.all_gather_object(out, dict(stats.sent), group=group)
    return [o or {} for o in out]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -- timed waits ----------------------------------------------------------------------------------------------------
def _where(group: dist.ProcessGroup | None, step: str) -> str:
    label = f" at step '{step}'" if step else ""
    return f"rank {group_rank(group)} of {group_size(group)}{label}"


def wait(work: dist.Work, group: dist.ProcessGroup | None, step: str, what: str, timeout: float | None) -> None:
    """Wait for one operation; a timeout or a failed peer raises RunFailure naming this rank, ``what`` and ``step``."""
    t = DEFAULT_TIMEOUT_S if timeout is None else timeout
    try:
        ok = work.wait(timeout=datetime.timedelta(seconds=t))
    except (RuntimeError, dist.DistError) as exc:
        raise RunFailure(f"{_where(group, step)}: {what} did not complete within {t:g} s ({exc})") from exc
    if ok is False:
        raise RunFailure(f"{_where(group, step)}: {what} did not complete within {t:g} s")


def exchange(
    sends: Sequence[tuple[int, torch.Tensor]],
    recvs: Sequence[tuple[int, torch.Tensor]],
    group: dist.ProcessGroup | None,
    *,
    stats: CommStats | None,
    category: str,
    step: str = "",
    timeout: float | None = None,
    block: bool = True,
    tag: int = 0,
) -> "Pending":
    """Post point-to-point sends and receives (peers are group ranks) as one batch and count the sent bytes.

    With ``block`` the call waits (timed) before returning; otherwise call ``.wait()`` on the result before using
    the receive buffers (this lets the caller compute while the messages travel). ``tag`` keeps two streams of
    messages between the same pair apart on gloo (NCCL matches by posting order, which every caller keeps).
    """
    g = group if group is not None else dist.group.WORLD
    stage = _stages_on_cpu(g)
    ops, copy_back = [], []
    for peer, t in sends:
        t = t.cpu() if stage and t.is_cuda else t.contiguous()
        ops.append(dist.P2POp(dist.isend, t, group=g, tag=tag, group_peer=peer))
    for peer, t in recvs:
        check(t.is_contiguous(), "receive buffer", tuple(t.shape), "must be contiguous")
        if stage and t.is_cuda:
            copy_back.append((t, torch.empty(t.shape, dtype=t.dtype)))
            t = copy_back[-1][1]
        ops.append(dist.P2POp(dist.irecv, t, group=g, tag=tag, group_peer=peer))
    works = dist.batch_isend_irecv(ops) if ops else []
    if stats is not None and sends:
        stats.add(category, sum(nbytes(t) for _, t in sends), messages=len(sends))
    labels = [f"send to rank {p}" for p, _ in sends] + [f"receive from rank {p}" for p, _ in recvs]
    if len(works) != len(ops):  # NCCL coalesces the batch into one work: name every peer in it
        labels = [f"batch with ranks {sorted({p for p, _ in list(sends) + list(recvs)})}"] * len(works)
    pending = Pending(
        list(zip(works, labels)), g, step, category, timeout, keep=[op.tensor for op in ops], copy_back=copy_back
    )
    if block:
        pending.wait()
    return pending


def all_to_all(
    out: torch.Tensor,
    inp: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    stats: CommStats | None,
    category: str,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """``all_to_all_single`` with equal splits along dim 0 and a timed wait; counts the bytes leaving this rank."""
    n = group_size(group)
    stage = out.is_cuda and _stages_on_cpu(group)
    dst = torch.empty(out.shape, dtype=out.dtype) if stage else out
    work = dist.all_to_all_single(dst, inp.cpu() if stage else inp.contiguous(), group=group, async_op=True)
    if stats is not None:
        stats.add(category, nbytes(inp) * (n - 1) // n)
    wait(work, group, step, f"all-to-all '{category}'", timeout)
    if stage:
        out.copy_(dst)
    return out


def all_sum(
    t: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    stats: CommStats | None,
    category: str,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """A copy of ``t`` summed over the group (``all_reduce``, timed wait); counts the bytes leaving this rank."""
    out = t.detach().clone()
    stage = out.is_cuda and _stages_on_cpu(group)
    buf = out.cpu() if stage else out
    work = dist.all_reduce(buf, group=group, async_op=True)
    if stats is not None:
        stats.add(category, nbytes(buf))
    wait(work, group, step, f"all-reduce '{category}'", timeout)
    return buf.to(out.device) if stage else buf


def _stages_on_cpu(group: dist.ProcessGroup | None) -> bool:
    """True for a gloo group: its point-to-point and all-to-all take CPU tensors only, so CUDA ones are staged."""
    return dist.get_backend(group) == "gloo"


@dataclass
class Pending:
    """Posted point-to-point operations; :meth:`wait` waits on each with the timeout and names the silent peer."""

    works: list[tuple[dist.Work, str]]
    group: dist.ProcessGroup
    step: str
    category: str
    timeout: float | None
    keep: list[torch.Tensor] = field(default_factory=list)
    """Tensors the posted operations read or write (kept alive until the wait)."""
    copy_back: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(receive buffer, CPU staging buffer) pairs to copy after the wait (CUDA tensors over gloo)."""

    def wait(self) -> None:
        for work, label in self.works:
            wait(work, self.group, self.step, f"{self.category}: {label}", self.timeout)
        for dst, src in self.copy_back:
            dst.copy_(src)
        self.works, self.keep, self.copy_back = [], [], []
