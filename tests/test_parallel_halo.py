"""Window sharding and halo exchange: pure index checks, and N gloo processes against single-process windowed
attention (a naive masked dense reference: token i attends token j iff they share a window of the layer grid)."""

from __future__ import annotations

import pytest
import torch

from atlasvid_dist.errors import InputError, PlanError
from atlasvid_dist.geometry import Grid, WindowSpec, window_layout
from atlasvid_dist.models.attention.kernels import group_windows
from atlasvid_dist.parallel import comm
from atlasvid_dist.parallel.halo import halo_exchange, halo_plan
from atlasvid_dist.parallel.sharding import shard_windows

from ._dist import run_ranks

B, H, D = 2, 2, 4
TOL = dict(rtol=1e-9, atol=1e-9)  # float64

EVEN = Grid(4, 4, 6)  # base window (2, 2, 3): 8 windows
ODD = Grid(3, 5, 6)  # base window (2, 2, 3) padded: 12 windows of 12, 6 or 3 real tokens
#: (base spec, layer spec) pairs: the base grid itself, a half-window shift, a shift plus another window size
CASES = [
    (WindowSpec(EVEN, (2, 2, 3)), WindowSpec(EVEN, (2, 2, 3))),
    (WindowSpec(EVEN, (2, 2, 3)), WindowSpec(EVEN, (2, 2, 3), (1, 1, 1))),
    (WindowSpec(ODD, (2, 2, 3), pad=True), WindowSpec(ODD, (2, 2, 3), (1, 1, 1))),
    (WindowSpec(ODD, (2, 2, 3), pad=True), WindowSpec(ODD, (1, 3, 2), (0, 1, 1))),
]


# -- pure index arithmetic ----------------------------------------------------------------------------------------
# The plan's index tensors read the obvious way (what ShardedWindowAttention gathers chunk by chunk).
def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(x.shape[0], rows, *x.shape[2:])], dim=1)


def gather_queries(x_local: torch.Tensor, plan) -> torch.Tensor:
    """(B, N_local, ...) -> (B, W, Lq, ...) own query rows per window (zeros at padding rows)."""
    w, lq = plan.query_index.shape
    return _pad_rows(x_local, 1).index_select(1, plan.query_index.reshape(-1)).unflatten(1, (w, lq))


def gather_keys(x_local: torch.Tensor, x_halo: torch.Tensor, plan) -> torch.Tensor:
    """(B, N_local, ...) and (B, N_halo, ...) -> (B, W, window_tokens, ...) key/value rows per window."""
    w, lk = plan.key_index.shape
    rows = _pad_rows(torch.cat([x_local, x_halo], dim=1), 1)  # (B, N_local + N_halo + 1, ...)
    return rows.index_select(1, plan.key_index.reshape(-1)).unflatten(1, (w, lk))


def scatter_output(out_windows: torch.Tensor, plan) -> torch.Tensor:
    """(B, W, Lq, ...) per-window query outputs -> (B, N_local, ...) in local order (padding rows dropped)."""
    return out_windows.flatten(1, 2).index_select(1, plan.output_index)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 12])
def test_sharding_is_contiguous_balanced_and_complete(world):
    spec = CASES[2][0]
    sh = shard_windows(spec, world)
    lay = window_layout(spec)
    weights = lay.valid.sum(1)
    ranges = [sh.window_range(r) for r in range(world)]
    assert [r.start for r in ranges] == [0] + [r.stop for r in ranges[:-1]] and ranges[-1].stop == spec.num_windows
    assert all(len(r) >= 1 for r in ranges)
    loads = [int(weights[r.start : r.stop].sum()) for r in ranges]
    assert loads == sh.tokens_per_rank and sum(loads) == spec.grid.size
    assert max(loads) - min(loads) <= 2 * int(weights.max())  # within a window of the ideal on both ends
    all_tokens = torch.cat([sh.token_index(r) for r in range(world)])
    assert torch.equal(all_tokens.sort().values, torch.arange(spec.grid.size))  # every token exactly once
    assert torch.equal(all_tokens, lay.order[lay.order < spec.grid.size])  # window-major order, rank after rank
    for r in range(world):
        idx = sh.token_index(r)
        assert torch.equal(sh.owner[idx], torch.full_like(idx, r))
        assert torch.equal(sh.local_position[idx], torch.arange(idx.numel()))
    x = torch.randn(1, spec.grid.size, 3)
    assert torch.equal(sh.unshard([sh.shard(x, r) for r in range(world)]), x)


def test_sharding_balances_uniform_windows_to_one_window():
    sh = shard_windows(WindowSpec(EVEN, (2, 2, 3)), 3)  # 8 windows of 12 tokens
    assert [len(sh.window_range(r)) for r in range(3)] in ([3, 3, 2], [3, 2, 3], [2, 3, 3])


def test_fewer_windows_than_ranks_is_a_plan_error():
    spec = WindowSpec(EVEN, (2, 2, 3))
    with pytest.raises(PlanError, match="8 windows.*9 ranks"):
        shard_windows(spec, 9)


def _simulate(sharding, spec):
    """Run every rank's plan in one process with raster ids as payload: per rank, key ids and query ids."""
    world = sharding.world_size
    plans = [halo_plan(sharding, spec, r) for r in range(world)]
    ids = [sharding.token_index(r).double()[None, :, None] for r in range(world)]  # (1, N_r, 1)
    sent = {(r, p): ids[r].index_select(1, idx) for r in range(world) for p, idx in plans[r].send}
    out = []
    for r, plan in enumerate(plans):
        halo = torch.cat([sent[(p, r)] for p, _ in plan.recv] or [ids[r][:, :0]], dim=1)
        assert [c for _, c in plan.recv] == [sent[(p, r)].shape[1] for p, _ in plan.recv]
        keys, queries = gather_keys(ids[r], halo, plan)[0, ..., 0], gather_queries(ids[r], plan)[0, ..., 0]
        out.append((plan, keys, queries, ids[r], torch.cat([ids[r], halo], dim=1)[0, :, 0]))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_halo_plan_assembles_every_touched_window(world, case):
    base, spec = CASES[case]
    sh = shard_windows(base, world)
    lay = window_layout(spec)
    slots = lay.order.view(spec.num_windows, spec.window_tokens)
    for plan, keys, queries, ids, rows in _simulate(sh, spec):
        for _w, (win, kv, kvalid, q, qvalid) in enumerate(
            zip(plan.windows, keys, plan.key_valid, queries, plan.query_valid)
        ):
            real = slots[win][lay.valid[win]]
            assert torch.equal(kv[kvalid].long().sort().values, real.sort().values)  # own + halo = whole window
            own = real[sh.owner[real] == plan.rank]
            assert torch.equal(q[qvalid].long().sort().values, own.sort().values)  # queries: own tokens only
        # the attention's groups (kernels.group_windows): every own token a query once, keys = the whole window
        groups = group_windows(plan.query_index, plan.query_valid, plan.key_index, plan.key_valid)
        assert sorted(torch.cat([g.query.reshape(-1) for g in groups]).tolist()) == list(range(plan.num_local))
        lq = plan.query_index.shape[1]
        for grp in groups:
            for qrow, krow in zip(grp.query, grp.keys):
                win = plan.windows[plan.output_index[qrow[0]] // lq]  # the window of the group's row
                real = slots[win][lay.valid[win]]
                assert torch.equal(rows[krow].long().sort().values, real.sort().values)  # real keys, no padding
                assert torch.equal(plan.output_index[qrow] // lq, plan.output_index[qrow[:1]].expand(len(qrow)) // lq)
        # every own token is the query of exactly one row, and the output index finds it
        assert torch.equal(scatter_output(gather_queries(ids, plan), plan), ids)
        if spec == base:  # the base grid needs nothing from anyone
            assert plan.peers == [] and plan.num_halo == 0 and plan.num_sent == 0


def test_shifted_plan_only_talks_to_neighbours():
    base = WindowSpec(Grid(8, 4, 6), (1, 2, 3))  # 32 windows, 4 ranks own 2 time slices each
    spec = WindowSpec(base.grid, (1, 2, 3), (0, 1, 1))  # shifted in space only: no window crosses a time slice
    sh = shard_windows(base, 4)
    assert all(halo_plan(sh, spec, r).peers == [] for r in range(4))
    spec_t = WindowSpec(base.grid, (2, 2, 3), (1, 0, 0))  # a time shift: neighbours along the rank order only
    assert [halo_plan(sh, spec_t, r).peers for r in range(4)] == [[1], [0, 2], [1, 3], [2]]


def test_halo_exchange_refuses_a_wrong_token_count():
    sh = shard_windows(CASES[1][0], 2)
    plan = halo_plan(sh, CASES[1][1], 0)
    with pytest.raises(InputError, match="tokens"):
        halo_exchange(torch.zeros(1, plan.num_local + 1, 4), plan)


# -- N processes against the dense reference ----------------------------------------------------------------------
def _dense_windowed(spec, q, k, v, dout):
    """Naive masked dense attention over raster tokens (B, N, H, D): i attends j iff they share a window."""
    lay = window_layout(spec)
    window_of = torch.div(lay.inverse, spec.window_tokens, rounding_mode="floor")
    mask = window_of[:, None] == window_of[None, :]  # (N, N)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    scores = torch.einsum("bqhd,bkhd->bhqk", leaves[0], leaves[1]) / D**0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, leaves[2])
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _window_attention(qw, kw, vw, key_valid):
    """Attention inside windows: qw (B, W, Lq, H, D), kw/vw (B, W, Lk, H, D), key_valid (W, Lk)."""
    scores = torch.einsum("bwqhd,bwkhd->bwhqk", qw, kw) / D**0.5
    probs = scores.masked_fill(~key_valid[None, :, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bwhqk,bwkhd->bwqhd", probs, vw)


def _halo_vs_dense(rank: int, world: int) -> list[int]:
    sent = []
    for case, (base, spec) in enumerate(CASES):
        g = torch.Generator().manual_seed(case)
        q, k, v, dout = (torch.randn(B, base.grid.size, H, D, generator=g, dtype=torch.float64) for _ in range(4))
        ref_out, ref_grads = _dense_windowed(spec, q, k, v, dout)
        sh = shard_windows(base, world)
        plan = halo_plan(sh, spec, rank)
        mine = [sh.shard(t, rank).requires_grad_() for t in (q, k, v)]  # (B, N_local, H, D)
        stats = comm.CommStats()
        kv = torch.cat([mine[1], mine[2]], dim=-1)  # keys and values in one message per peer
        halo = halo_exchange(kv, plan, None, stats, step=f"case {case}")
        kvw = gather_keys(kv, halo, plan)  # (B, W, window_tokens, H, 2D)
        qw, (kw, vw) = gather_queries(mine[0], plan), kvw.split(D, dim=-1)
        out_w = _window_attention(qw, kw, vw, plan.key_valid)  # (B, W, Lq, H, D): padded rows computed, dropped
        out = scatter_output(out_w, plan)
        out.backward(sh.shard(dout, rank))
        torch.testing.assert_close(out, sh.shard(ref_out, rank), **TOL)
        for got, want in zip(mine, ref_grads):
            torch.testing.assert_close(got.grad, sh.shard(want, rank), **TOL)
        row = B * H * 2 * D * 8  # one token's keys and values, float64
        assert stats.sent.get("halo.fwd", 0) == plan.num_sent * row, (case, stats.sent)
        assert stats.sent.get("halo.bwd", 0) == plan.num_halo * row, (case, stats.sent)
        if spec == base:
            assert stats.total() == 0 and not stats.messages  # an unshifted layer does not communicate
        # what all ranks sent is what all ranks received (every rank's plan, built here without processes)
        everyone = comm.gather_stats(stats)
        received = sum(halo_plan(sh, spec, r).num_halo for r in range(world)) * row
        assert sum(s.get("halo.fwd", 0) for s in everyone) == received
        sent.append(stats.total())
    return sent


@pytest.mark.slow  # spawns 2-4 gloo processes
@pytest.mark.parametrize("world", [2, 3, 4])
def test_halo_exchange_matches_dense_windowed_attention(world):
    sent = run_ranks(_halo_vs_dense, world, timeout=90)
    assert all(s[0] == 0 for s in sent)  # the base grid
    assert all(sum(s[1:]) > 0 for s in sent)  # every rank exchanges something in the shifted cases
