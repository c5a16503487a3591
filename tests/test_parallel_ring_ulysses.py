"""Ring and Ulysses attention on N gloo processes against dense single-process attention (forward and gradients)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from atlasvid_dist.errors import PlanError, RunFailure
from atlasvid_dist.parallel import comm
from atlasvid_dist.parallel.ring import ring_attention
from atlasvid_dist.parallel.ulysses import ulysses_attention

from ._dist import run_ranks

B, H, L_LOCAL, D, C = 2, 4, 3, 8, 5
TOL = dict(rtol=1e-9, atol=1e-9)  # float64 end to end


def _inputs(n: int, seed: int = 0):
    """The same full-sequence tensors on every rank: q, k, v (B, H, n*L_LOCAL, D), extra k/v, output gradient."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, n * L_LOCAL, D, generator=g, dtype=torch.float64) for _ in range(4))
    ek, ev = (torch.randn(B, H, C, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, ek, ev, dout


def _dense(q, k, v, dout, ek=None, ev=None):
    """Single-process reference: plain softmax attention and its autograd gradients."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((ek, ev) if ek is not None else ())]
    kk, vv = leaves[1], leaves[2]
    if ek is not None:
        kk, vv = torch.cat([kk, leaves[3]], 2), torch.cat([vv, leaves[4]], 2)
    scores = leaves[0] @ kk.transpose(-1, -2) / D**0.5  # (B, H, L, L + C)
    out = scores.softmax(-1) @ vv
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _shard(x, r, n):
    return x.chunk(n, dim=2)[r]


def _run_sharded(fn, r, n, group, stats, with_extra, seed):
    """Run ``fn`` on rank r's shards; return (out, grads of q, k, v[, extra k, extra v]) and the references."""
    q, k, v, ek, ev, dout = _inputs(n, seed)
    ref_out, ref_grads = _dense(q, k, v, dout, *((ek, ev) if with_extra else ()))
    mine = [_shard(t, r, n).clone().requires_grad_() for t in (q, k, v)]
    extra = [t.clone().requires_grad_() for t in (ek, ev)] if with_extra else [None, None]
    out = fn(*mine, group, stats, extra_k=extra[0], extra_v=extra[1], step="test")
    out.backward(_shard(dout, r, n))
    torch.testing.assert_close(out, _shard(ref_out, r, n), **TOL)
    for got, want in zip(mine, ref_grads[:3]):
        torch.testing.assert_close(got.grad, _shard(want, r, n), **TOL)
    if with_extra:  # each rank holds its queries' part of the replicated keys' gradient; the sum is the full one
        for got, want in zip(extra, ref_grads[3:]):
            total = got.grad.clone()
            dist.all_reduce(total, group=group)
            torch.testing.assert_close(total, want, **TOL)
            assert not torch.allclose(got.grad, want)  # a part, not the whole (else the check above proves nothing)


def _ring_and_ulysses(rank: int, world: int) -> dict:
    torch.manual_seed(rank)
    kv_bytes = 2 * B * H * L_LOCAL * D * 8
    report = {}
    for with_extra in (False, True):
        stats = comm.CommStats()
        _run_sharded(ring_attention, rank, world, None, stats, with_extra, seed=1 + with_extra)
        # forward: n-1 hops of the (k, v) block; backward: n-1 hops of (k, v) and n hops of the fp64 dk/dv
        assert stats.sent["ring.fwd"] == (world - 1) * kv_bytes, stats.sent
        assert stats.sent["ring.bwd"] == (world - 1) * kv_bytes + world * kv_bytes, stats.sent
        report[f"ring extra={with_extra}"] = stats.total()

    stats = comm.CommStats()
    if H % world:
        with pytest.raises(PlanError, match="divisible"):
            ulysses_attention(*(torch.zeros(B, H, L_LOCAL, D) for _ in range(3)), None, stats)
        assert stats.total() == 0  # refused before any communication
        report["ulysses"] = "PlanError"
    else:
        for with_extra in (False, True):
            _run_sharded(ulysses_attention, rank, world, None, stats, with_extra, seed=3 + with_extra)
        numel = B * H * L_LOCAL * D
        # per call: q, k, v out and the output back, forward and backward; each rank keeps 1/n of every exchange
        assert stats.sent["ulysses.fwd"] == 2 * 4 * numel * 8 * (world - 1) // world
        assert stats.sent["ulysses.bwd"] == stats.sent["ulysses.fwd"]
        report["ulysses"] = stats.total()

    if world == 4:  # a sub-group whose group ranks differ from the global ranks
        sub = dist.new_group([1, 2, 3])
        if rank in (1, 2, 3):
            r = dist.get_rank(sub)
            _run_sharded(ring_attention, r, 3, sub, comm.CommStats(), True, seed=5)
            with pytest.raises(PlanError):
                ulysses_attention(*(torch.zeros(B, H, L_LOCAL, D) for _ in range(3)), sub)
        report["subgroup"] = rank in (1, 2, 3)
    return report


@pytest.mark.slow  # spawns 2-4 gloo processes
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_and_ulysses_match_dense(world):
    reports = run_ranks(_ring_and_ulysses, world, timeout=90)
    assert len(reports) == world and all(r["ring extra=True"] > 0 for r in reports)
    assert all(r["ulysses"] == ("PlanError" if H % world else reports[0]["ulysses"]) for r in reports)


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_block_kernels_merged_by_lse_match_dense(kernel):
    """The per-block kernels (the fused CPU one, and the explicit fallback used where no fused kernel fits),
    merged by log-sum-exp, give dense attention; their backward with the merged out/lse gives dense gradients."""
    from atlasvid_dist.parallel import ring

    fwd = ring._block_forward if kernel == "fused" else ring._math_forward
    bwd = ring._block_backward if kernel == "fused" else ring._math_backward
    q, k, v, _, _, dout = _inputs(2)
    ref_out, (dq, dk, dv) = _dense(q, k, v, dout)
    blocks = list(zip(k.chunk(3, 2), v.chunk(3, 2)))
    out = lse = None
    for kb, vb in blocks:
        out, lse = ring._merge(out, lse, *fwd(q, kb, vb, D**-0.5))
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) * D**-0.5).logsumexp(-1), **TOL)
    grads = [bwd(dout, q, kb, vb, out, lse, D**-0.5) for kb, vb in blocks]
    torch.testing.assert_close(sum(g[0] for g in grads), dq, **TOL)
    torch.testing.assert_close(torch.cat([g[1] for g in grads], 2), dk, **TOL)
    torch.testing.assert_close(torch.cat([g[2] for g in grads], 2), dv, **TOL)


def _silent_peer(rank: int, world: int) -> str:
    if rank == 1:  # alive but never sends: rank 0 must not hang (a timeout closes the pair, so no barrier after)
        time.sleep(2.5)
        return "silent"
    x = torch.randn(1, 2, 3, 4)
    try:
        ring_attention(x, x, x, None, comm.CommStats(), step="denoise 7 / layer 3", timeout=1.0)
    except RunFailure as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow  # spawns 2 gloo processes
def test_silent_rank_times_out_and_is_named():
    msg, silent = run_ranks(_silent_peer, 2, timeout=60)
    assert silent == "silent"
    assert "rank 1" in msg.split(":", 1)[1] and "rank 0 of 2" in msg and "denoise 7 / layer 3" in msg, msg


# -- CUDA (skipped without a GPU) -------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_block_kernels_merged_by_lse_match_dense(dtype):
    """CUDA flash kernel (fp16/bf16) or the explicit fallback (fp32), 3 key blocks merged, against fp64 dense."""
    from atlasvid_dist.parallel import ring

    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, 256, 64, generator=g, dtype=torch.float64).cuda() for _ in range(4))
    s = q @ k.transpose(-1, -2) * 64**-0.5  # (B, H, L, L) fp64 reference at head dim 64
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = (leaves[0] @ leaves[1].transpose(-1, -2) * 64**-0.5).softmax(-1) @ leaves[2]
    ref_out.backward(dout)
    dq, dk, dv = (t.grad for t in leaves)
    qd, kd, vd, dod = (t.to(dtype) for t in (q, k, v, dout))
    assert ring._use_cuda_flash(qd) == (dtype != torch.float32)
    blocks = list(zip(kd.chunk(2, 2), vd.chunk(2, 2)))
    out = lse = None
    for kb, vb in blocks:
        out, lse = ring._merge(out, lse, *ring._block_forward(qd, kb, vb, 64**-0.5))
    out = out.to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref_out.detach(), **tol)
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), **tol)
    grads = [ring._block_backward(dod, qd, kb, vb, out, lse, 64**-0.5) for kb, vb in blocks]
    torch.testing.assert_close(sum(g_[0].double() for g_ in grads), dq, **tol)
    torch.testing.assert_close(torch.cat([g_[1] for g_ in grads], 2).double(), dk, **tol)
    torch.testing.assert_close(torch.cat([g_[2] for g_ in grads], 2).double(), dv, **tol)


def _nccl_single_rank(rank: int, world: int) -> str:
    """World of 1 on NCCL: the autograd Functions and the init path on a GPU (no peers to talk to)."""
    torch.cuda.synchronize()
    q, k, v, ek, ev, dout = (t.cuda() for t in _inputs(1))
    ref_out, ref_grads = _dense(q, k, v, dout, ek, ev)
    for fn in (ring_attention, ulysses_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, ek, ev)]
        out = fn(*leaves[:3], None, comm.CommStats(), extra_k=leaves[3], extra_v=leaves[4])
        out.backward(dout)
        torch.testing.assert_close(out, ref_out, **TOL)
        for got, want in zip(leaves, ref_grads):
            torch.testing.assert_close(got.grad, want, **TOL)
    return "ok"


@pytest.mark.gpu
@cuda
def test_nccl_single_rank_matches_dense():
    assert run_ranks(_nccl_single_rank, 1, backend="nccl", timeout=120) == ["ok"]
