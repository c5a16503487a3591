"""Moving residual rows between holdings (parallel/migrate.py): every shifted window given whole to the rank that
holds most of it, the move plans of all ranks together rebuild exactly the destination layout, and back."""

import pytest
import torch

from atlasvid_dist.geometry.grid import Grid
from atlasvid_dist.geometry.windows import WindowSpec, window_layout
from atlasvid_dist.parallel.migrate import move_plan
from atlasvid_dist.parallel.sharding import assign_windows, shard_windows, window_counts

GRID = Grid(6, 12, 16)
BASE = WindowSpec(GRID, (3, 4, 4), (0, 0, 0), pad=True)
SHIFTED = WindowSpec(GRID, (3, 4, 4), (1, 2, 2), pad=True)


def _apply(src, dst, x: torch.Tensor) -> list[torch.Tensor]:
    """Run every rank's move plan against the others' without a process group: what each rank ends with."""
    g = src.world_size
    plans = [move_plan(src, dst, r) for r in range(g)]
    parts = [src.shard(x, r) for r in range(g)]
    mail = {(r, p): parts[r].index_select(1, idx) for r in range(g) for p, idx in plans[r].send}
    out = []
    for r, plan in enumerate(plans):
        bufs = []
        for p, n in plan.recv:
            assert mail[(p, r)].shape[1] == n
            bufs.append(mail[(p, r)])
        out.append(torch.cat([parts[r], *bufs], 1).index_select(1, plan.index))
    return out


@pytest.mark.parametrize("order", ["thw", "wht"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_moves_rebuild_the_destination_layout_and_back(order, world):
    base = shard_windows(BASE, world, order)
    shifted = assign_windows(base.owner, SHIFTED, world)
    x = torch.arange(GRID.size, dtype=torch.float32)[None, :, None].expand(2, -1, 3)  # (B, N, C): raster ids
    there = _apply(base, shifted, x)
    for r in range(world):
        assert torch.equal(there[r], shifted.shard(x, r))
    back = _apply(shifted, base, shifted.unshard(there))
    for r in range(world):
        assert torch.equal(back[r], base.shard(x, r))


def test_every_shifted_window_goes_whole_to_the_rank_holding_most_of_it():
    base = shard_windows(BASE, 3, "wht")
    shifted = assign_windows(base.owner, SHIFTED, 3)
    counts = window_counts(base.owner, SHIFTED, 3)  # (nw, 3)
    lay = window_layout(SHIFTED)
    for w in range(lay.num_windows):
        rank = int(shifted.window_owner[w])
        assert counts[w, rank] == counts[w].max()
        tokens = lay.order.view(lay.num_windows, -1)[w][lay.valid[w]]
        assert bool((shifted.owner[tokens] == rank).all())  # the window is whole on one rank
    assert sorted(torch.cat([shifted.token_index(r) for r in range(3)]).tolist()) == list(range(GRID.size))


def test_a_move_sends_only_the_rows_that_change_rank():
    base = shard_windows(BASE, 3, "wht")
    shifted = assign_windows(base.owner, SHIFTED, 3)
    moved = int((base.owner != shifted.owner).sum())
    assert 0 < moved < GRID.size // 2
    assert sum(move_plan(base, shifted, r).num_sent for r in range(3)) == moved
    assert sum(move_plan(shifted, base, r).num_sent for r in range(3)) == moved


def test_windows_cut_in_the_middle_balance_the_ranks():
    """Ties (a window two ranks hold equal shares of) go to the less loaded rank: the holdings of a shifted layer
    stay as even as the base sharding's instead of the first rank collecting every tie."""
    grid = Grid(3, 16, 64)
    base = shard_windows(WindowSpec(grid, (3, 4, 4), (0, 0, 0)), 4, "wht")  # 4 columns of windows per rank
    shifted = assign_windows(base.owner, WindowSpec(grid, (3, 4, 4), (0, 2, 2), pad=True), 4)
    counts = window_counts(base.owner, shifted.spec, 4)
    ties = (counts == counts.max(1, keepdim=True).values).sum(1) == 2  # windows cut in half by a rank boundary
    assert int(ties.sum()) > 0
    assert max(shifted.tokens_per_rank) - min(shifted.tokens_per_rank) <= 48  # within one window's tokens
