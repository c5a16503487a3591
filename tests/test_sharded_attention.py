"""ShardedWindowAttention: window-sharded blocks on N gloo ranks equal the single-process AtlasTransformer forward."""

import pytest
import torch

from ._dist import run_ranks

LAT = (1, 16, 9, 16, 24)  # token grid (9, 8, 12); window (3, 4, 4) -> 3 x 2 x 3 = 18 windows (uneven over 4)


def _setup(seed=0, lat=LAT):
    from atlasvid_dist import AtlasConfig, AtlasTransformer
    from atlasvid_dist.models.tiny import build_tiny_transformer

    model = AtlasTransformer(
        build_tiny_transformer(seed),
        AtlasConfig(mode="atlas", window=(3, 4, 4), shift=True, temporal_scale=4, spatial_scale=2),
    )
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lat, generator=g)
    enc = torch.randn(1, 7, 32, generator=g)
    grid = model.token_grid(x)
    pg = model.proxy_geometry(grid).grid
    proxy = torch.randn(1, 16, pg.t, pg.h * 2, pg.w * 2, generator=g)
    return model, x, torch.tensor([700.0]), enc, proxy


@torch.no_grad()
def _sharded_forward(rank, world, exchange="kv", order="thw"):
    import torch.distributed as dist

    from atlasvid_dist.parallel.comm import CommStats
    from atlasvid_dist.parallel.window_attention import ShardedWindowAttention, shard_for

    model, x, t, enc, proxy = _setup()
    ref = model(x, t, enc, proxy=proxy)
    grid = model.token_grid(x)
    cache = model.build_proxy_cache(proxy, enc)
    sharding = shard_for(model.atlas_config, grid, world, order)
    stats = CommStats()
    attend = ShardedWindowAttention(
        model.atlas_config,
        grid,
        model.rotary,
        sharding,
        rank,
        "cpu",
        cache.kv,
        model.proxy_geometry(grid).scales,
        stats=stats,
        timeout=30,
        exchange=exchange,
    )
    tokens, temb, tproj, text = model.embed(x, t, enc)
    mine = sharding.shard(tokens, rank)  # (B, N_local, D)
    out = model.run_blocks(mine, text, tproj, attend, move=attend.move if exchange == "rows" else None)
    parts = [None] * world
    dist.all_gather_object(parts, out)
    full = sharding.unshard(parts)
    got = model.head(full, temb, grid, x.shape[0])
    windows = len(sharding.window_range(rank))
    full_proxy = sum(k.numel() * k.element_size() for k in cache.kv.keys + cache.kv.values)
    return {
        "rows": stats.total("halo.rows"),
        "diff": float((got - ref).abs().max()),
        "layer_bytes": dict(attend.layer_bytes),
        "halo": stats.total("halo"),
        "windows": windows,
        "proxy_bytes": attend.proxy_bytes(),
        "full_proxy_bytes": full_proxy,
    }


@pytest.mark.slow  # spawns 2-4 gloo processes
@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_blocks_equal_single_process(world):
    res = run_ranks(_sharded_forward, world, timeout=120)
    for r in res:
        assert r["diff"] <= 1e-5, res
        assert r["layer_bytes"][0] == 0  # unshifted layer: no communication
        assert r["layer_bytes"][1] > 0  # shifted layer: a halo
        assert r["halo"] == r["layer_bytes"][1]
    if world == 4:
        assert len({r["windows"] for r in res}) > 1  # uneven window counts per rank
        assert all(0 < r["proxy_bytes"] <= r["full_proxy_bytes"] for r in res)  # aligned regions only


@pytest.mark.slow  # spawns 3 gloo processes
@pytest.mark.parametrize("order", ["thw", "wht"])
def test_shifted_layers_by_moving_rows_equal_single_process(order):
    """Shift exchange 'rows': each shifted window is computed whole by one rank after its rows moved there; the
    output equals one process, and the only traffic is the rows (no key/value halo)."""
    res = run_ranks(_sharded_forward, 3, "rows", order, timeout=120)
    for r in res:
        assert r["diff"] <= 1e-5, res
        assert r["halo"] == r["rows"] == sum(r["layer_bytes"].values())  # rows only: no keys/values sent
    assert sum(r["rows"] for r in res) > 0
    kv = run_ranks(_sharded_forward, 3, "kv", order, timeout=120)
    assert max(r["rows"] for r in res) < max(r["halo"] for r in kv)  # half the bytes or less


def test_refuses_other_modes_and_grids():
    from atlasvid_dist import AtlasConfig, ConfigError
    from atlasvid_dist.parallel.window_attention import ShardedWindowAttention, shard_for

    model, x, *_ = _setup()
    grid = model.token_grid(x)
    sharding = shard_for(model.atlas_config, grid, 2)
    with pytest.raises(ConfigError):
        ShardedWindowAttention(AtlasConfig(mode="full"), grid, model.rotary, sharding, 0, "cpu")
    with pytest.raises(ConfigError):
        ShardedWindowAttention(AtlasConfig(mode="atlas", window=(3, 8, 4)), grid, model.rotary, sharding, 0, "cpu")


@torch.no_grad()
def test_a_rank_records_only_its_proxy_rows():
    """Recording the proxy with a rank's ProxyRows as ``keep`` gives exactly the rows that selecting from the
    whole cache gives, layer by layer, and no more; a window attention refuses keys/values kept for another
    rank."""
    from atlasvid_dist import InputError
    from atlasvid_dist.models.atlas_transformer import ProxyCache
    from atlasvid_dist.parallel.window_attention import ProxyRows, ShardedWindowAttention, shard_for

    model, x, _, enc, proxy = _setup(lat=(1, 16, 9, 32, 48))  # 72 windows, proxy grid (3, 8, 12)
    grid = model.token_grid(x)
    pgrid, scales = model.token_grid(proxy, "proxy"), model.proxy_geometry(grid).scales
    whole = model.build_proxy_cache(proxy, enc).kv
    sharding = shard_for(model.atlas_config, grid, 3, "wht")  # column slabs: each reads a part of the proxy
    attends, sizes = [], []
    for rank in range(3):
        keep = ProxyRows.of_rank(model.atlas_config, grid, sharding, rank, pgrid, scales)
        kept = model.build_proxy_cache(proxy, enc, keep).kv
        assert kept.partial()
        for layer in range(len(whole.keys)):
            rows = keep(layer)
            assert torch.equal(kept.rows[layer], rows)
            assert 0 < rows.numel() <= pgrid.size
            sizes.append(rows.numel())
            assert torch.equal(kept.keys[layer], whole.keys[layer].index_select(1, rows))
            assert torch.equal(kept.values[layer], whole.values[layer].index_select(1, rows))
        args = (model.atlas_config, grid, model.rotary, sharding, rank, "cpu")
        a, b = ShardedWindowAttention(*args, kept, scales), ShardedWindowAttention(*args, whole, scales)
        assert a.proxy_bytes() == b.proxy_bytes() == kept.nbytes() <= whole.nbytes()
        attends.append(kept)
    assert (
        min(sizes) < pgrid.size and min(a.nbytes() for a in attends) < whole.nbytes()
    )  # aligned regions of a rank's windows, not the whole proxy
    with pytest.raises(ValueError, match="other rows"):
        ShardedWindowAttention(model.atlas_config, grid, model.rotary, sharding, 1, "cpu", attends[0], scales)
    with pytest.raises(InputError, match="one rank's rows"):
        model(x, torch.tensor([700.0]), enc, proxy_cache=ProxyCache(attends[0], proxy, enc))
