"""A hung or dead peer is reported with the waiting rank, the operation and the step — never a silent hang."""

import time

import pytest
import torch

from atlasvid_dist.errors import RunFailure
from atlasvid_dist.parallel import comm
from atlasvid_dist.parallel.ring import ring_attention

from ._dist import run_ranks


def _hung_peer(rank, world, op):
    """Rank 1 never takes part (it sleeps past the timeout); rank 0 must fail in time, naming what it waited for."""
    if rank == 1:
        time.sleep(10.0)
        return "slept"
    t0 = time.monotonic()
    try:
        if op == "exchange":
            x = torch.ones(3)
            comm.exchange(
                [(1, x)], [(1, torch.empty(3))], None, stats=None, category="halo.fwd", step="layer 3", timeout=1.0
            )
        else:
            q = torch.randn(1, 2, 4, 8)
            ring_attention(q, q, q, None, step="proxy step 2", timeout=1.0)
    except RunFailure as e:
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


@pytest.mark.slow  # spawns 2 gloo processes
@pytest.mark.parametrize("op,step", [("exchange", "layer 3"), ("ring", "proxy step 2")])
def test_a_hung_peer_is_reported_with_rank_and_step(op, step):
    msg, seconds = run_ranks(_hung_peer, 2, op, timeout=60)[0]
    assert "rank 0 of 2" in msg and f"at step '{step}'" in msg and "within 1 s" in msg, msg
    assert "rank 1" in msg, msg  # the peer it waited for
    assert seconds < 8.0, seconds  # failed at its own timeout, not when the peer woke up
