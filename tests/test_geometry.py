"""Window reorder: exact round trip, membership equal to a naive loop, aligned proxy regions."""

import itertools

import pytest
import torch

from atlasvid_dist.geometry import Grid, WindowSpec, proxy_regions, window_layout

CASES = [
    (Grid(3, 4, 6), (3, 2, 3), (0, 0, 0), False),
    (Grid(3, 4, 6), (3, 2, 3), (0, 1, 1), False),
    (Grid(5, 7, 6), (2, 3, 4), (1, 1, 2), True),
    (Grid(4, 6, 8), (2, 3, 4), (1, 1, 2), False),
    (Grid(2, 5, 5), (2, 2, 2), (0, 0, 0), True),
]


def naive_windows(spec: WindowSpec):
    """Window-major list of windows, each a list of raster ids (-1 = padding), by plain loops."""
    g = spec.grid
    out = []
    for it, ih, iw in itertools.product(*(range(c) for c in spec.counts)):
        win = []
        for jt, jh, jw in itertools.product(*(range(w) for w in spec.window)):
            t = it * spec.window[0] + jt - spec.shift[0]
            h = ih * spec.window[1] + jh - spec.shift[1]
            w = iw * spec.window[2] + jw - spec.shift[2]
            inside = 0 <= t < g.t and 0 <= h < g.h and 0 <= w < g.w
            win.append((t * g.h + h) * g.w + w if inside else -1)
        out.append(win)
    return out


@pytest.mark.parametrize("grid,window,shift,pad", CASES)
def test_layout_matches_naive_loop(grid, window, shift, pad):
    spec = WindowSpec(grid, window, shift, pad)
    lay = window_layout(spec)
    order = lay.order.clone()
    order[order == grid.size] = -1
    assert order.reshape(spec.num_windows, -1).tolist() == naive_windows(spec)
    assert lay.valid.sum().item() == grid.size  # every token in exactly one window


@pytest.mark.parametrize("grid,window,shift,pad", CASES)
def test_round_trip_is_exact(grid, window, shift, pad):
    lay = window_layout(WindowSpec(grid, window, shift, pad))
    x = torch.randn(2, grid.size, 3)
    padded = torch.cat([x, torch.zeros(2, 1, 3)], dim=1)
    windowed = padded[:, lay.order]  # window-major
    assert torch.equal(windowed[:, lay.inverse], x)
    assert torch.equal(lay.order[lay.inverse], torch.arange(grid.size))


def test_axis_spanning_whole_grid_is_not_shifted():
    spec = WindowSpec(Grid(3, 8, 8), (3, 4, 8), (1, 2, 4))
    assert spec.shift == (0, 2, 0) and spec.counts == (1, 3, 1)


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 2, 2)])
def test_aligned_region_covers_proxy_above_every_token(shift):
    detail, proxy, scales = Grid(9, 12, 12), Grid(3, 6, 6), (4, 2, 2)
    spec = WindowSpec(detail, (3, 4, 4), shift, pad=True)
    index, size = proxy_regions(spec, proxy, scales, (0, 0, 0))
    assert index.shape == (spec.num_windows, size[0] * size[1] * size[2])
    lay = window_layout(spec)
    for w in range(spec.num_windows):
        region = set(index[w].tolist())
        for tok in lay.order.reshape(spec.num_windows, -1)[w].tolist():
            if tok == detail.size:
                continue
            t, h, x = tok // 144, (tok // 12) % 12, tok % 12
            above = ((t // 4) * proxy.h + h // 2) * proxy.w + x // 2
            assert above in region
    assert int(index.max()) < proxy.size and int(index.min()) >= 0


@pytest.mark.parametrize(
    "spec",
    [
        WindowSpec(Grid(5, 6, 10), (2, 4, 4), (1, 2, 2)),
        WindowSpec(Grid(5, 6, 10), (2, 4, 4), pad=True),
        WindowSpec(Grid(4, 8, 8), (2, 4, 4)),
        WindowSpec(Grid(21, 135, 240), (3, 15, 16), (1, 7, 8)),
    ],
)
def test_axis_lengths_and_real_pairs_match_the_layout(spec):
    real = window_layout(spec).valid.sum(1)  # (W,) real tokens per window, from the index tensors
    lengths = spec.axis_lengths()
    per_window = torch.tensor([a * b * c for a in lengths[0] for b in lengths[1] for c in lengths[2]])
    assert torch.equal(per_window, real)
    assert spec.real_token_pairs() == int((real * real).sum())
