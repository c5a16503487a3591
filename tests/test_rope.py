"""RoPE from positions: exact equality with diffusers at scale 1; proxy tokens share the detail token's position."""

import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from atlasvid_dist.geometry import Grid
from atlasvid_dist.models.rope import Rotary3D, apply_rotary, grid_positions


def test_tables_equal_diffusers_exactly():
    for head_dim, dims in [(12, (3, 8, 6)), (128, (5, 9, 16))]:
        ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
        cos_ref, sin_ref = ref(torch.zeros(1, 16, dims[0], dims[1] * 2, dims[2] * 2))  # (1, N, 1, D)
        tables = Rotary3D(head_dim).for_grid(Grid(*dims))
        assert torch.equal(tables.cos, cos_ref[0, :, 0, 0::2])
        assert torch.equal(tables.sin, sin_ref[0, :, 0, 1::2])
        assert torch.equal(cos_ref[0, :, 0, 0::2], cos_ref[0, :, 0, 1::2])  # pairs share one angle


def test_apply_matches_diffusers_arithmetic():
    head_dim, grid = 12, Grid(2, 3, 4)
    ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    cos, sin = ref(torch.zeros(1, 16, 2, 6, 8))
    x = torch.randn(2, grid.size, 2, head_dim)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    expect = torch.empty_like(x)
    expect[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    expect[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    assert torch.equal(apply_rotary(x, Rotary3D(head_dim).for_grid(grid)), expect)


def test_proxy_token_shares_position_with_detail_token_under_it():
    detail, proxy, r_t, s = Grid(9, 8, 8), Grid(3, 4, 4), 4, 2
    rot = Rotary3D(12)
    dpos = grid_positions(detail)
    ppos = grid_positions(proxy, (r_t, s, s))
    dt, pt = rot.tables(dpos), rot.tables(ppos)
    for p in range(proxy.size):
        t, h, w = p // 16, (p // 4) % 4, p % 4
        d = ((t * r_t) * 8 + h * s) * 8 + w * s
        assert torch.equal(ppos[p], dpos[d])
        assert torch.equal(pt.cos[p], dt.cos[d]) and torch.equal(pt.sin[p], dt.sin[d])


def test_fractional_positions_interpolate_angles():
    rot = Rotary3D(12)
    pos = torch.tensor([[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    tab = rot.tables(pos)
    base = rot.tables(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    angle_half = torch.atan2(tab.sin[0, :2], tab.cos[0, :2])
    angle_one = torch.atan2(base.sin[0, :2], base.cos[0, :2])
    torch.testing.assert_close(angle_half * 2, angle_one)


def test_tables_of_some_tokens_are_those_rows_of_the_grid_tables():
    """A rank builds the tables of its own tokens only; they equal the whole grid's rows, in the index's order."""
    rotary, grid = Rotary3D(12), Grid(3, 5, 7)
    index = torch.randperm(grid.size, generator=torch.Generator().manual_seed(0))[:40]
    part, whole = rotary.for_tokens(grid, index), rotary.for_grid(grid)
    assert torch.equal(part.cos, whole.cos[index]) and torch.equal(part.sin, whole.sin[index])
