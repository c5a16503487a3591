"""Windows shared by a group of ranks (window_group > 1, Ulysses inside the window): the detail stage gives the
one-process latents; layouts and bad plans are checked."""

import pytest
import torch

from atlasvid_dist.errors import ConfigError, PlanError
from atlasvid_dist.geometry.grid import Grid
from atlasvid_dist.geometry.windows import WindowSpec
from atlasvid_dist.parallel.sharding import shard_windows
from atlasvid_dist.parallel.window_group import group_layout

from ._dist import run_ranks

VALUES = dict(
    prompt="a red ball rolling",
    res="256x256",
    frames=9,
    steps=2,
    proxy_steps=2,
    window="3,4,8",
    guidance=3.0,
    spatial_scale=2,
)  # detail grid (3, 16, 16): 8 windows; the tiny model has 2 heads


def _setup():
    from atlasvid_dist.cli.generate import DEFAULTS, build_config
    from atlasvid_dist.pipeline.generate import TwoStageGenerator

    gen = TwoStageGenerator(build_config({**DEFAULTS, **VALUES}), progress=False)
    comp = gen.load()
    text = gen.encode(comp)
    return gen, comp, text, gen.stage1(comp, text, None, None)


def _detail_on_rank(rank, world, g):
    from atlasvid_dist.parallel.comm import CommStats
    from atlasvid_dist.parallel.window_group import new_groups
    from atlasvid_dist.runtime.detail import denoise_rank

    gen, comp, text, proxy = _setup()
    stats = CommStats()
    tokens, per_layer, _ = denoise_rank(
        gen, comp, text, proxy, rank, world, None, stats, 60, window_group=g, groups=new_groups(world, g)
    )
    return tokens.tolist(), stats.total()


def _reference():
    from atlasvid_dist.runtime.detail import denoise_rank

    gen, comp, text, proxy = _setup()
    tokens, _, _ = denoise_rank(gen, comp, text, proxy, 0, 1)
    return tokens  # one rank: local order of the single shard


@pytest.mark.slow  # spawns 2-4 gloo processes
@pytest.mark.parametrize("world,g", [(2, 2), (4, 2)])
def test_windows_split_over_groups_equal_one_process(world, g):
    from atlasvid_dist.parallel.window_attention import shard_for
    from atlasvid_dist.runtime.detail import from_tokens

    out = run_ranks(_detail_on_rank, world, g, timeout=180)
    gen = _setup()[0]
    grid = Grid(*[d for d in (3, 16, 16)])
    groups = shard_for(gen.cfg.method, grid, world // g)
    parts = [torch.cat([torch.tensor(out[j * g + s][0]) for s in range(g)], dim=1) for j in range(world // g)]
    got = from_tokens(groups.unshard(parts), grid)
    want = from_tokens(shard_for(gen.cfg.method, grid, 1).unshard([_reference()]), grid)
    assert got.shape == want.shape and float(want.abs().max()) > 0.1
    assert float((got - want).abs().max()) <= 1e-5
    assert all(sent > 0 for _, sent in out)  # the all-to-alls inside every group


def test_group_layout_slices_and_refusals():
    spec = WindowSpec(Grid(3, 16, 16), (3, 4, 8), (0, 0, 0))
    sharding = shard_windows(spec, 2)  # 2 groups of 384 tokens
    lays = [group_layout(sharding, r, 3) for r in range(6)]
    assert [(x.group, x.slot, x.start, x.count) for x in lays] == [
        (0, 0, 0, 128),
        (0, 1, 128, 128),
        (0, 2, 256, 128),
        (1, 0, 0, 128),
        (1, 1, 128, 128),
        (1, 2, 256, 128),
    ]
    assert [x.count for x in (group_layout(sharding, r, 5) for r in range(5))] == [77, 77, 77, 77, 76]
    tiny = shard_windows(WindowSpec(Grid(1, 2, 2), (1, 2, 2), (0, 0, 0)), 1)  # one window of 4 tokens
    with pytest.raises(PlanError, match="too few"):
        group_layout(tiny, 0, 3)  # slices of 2: the third rank would hold nothing


def test_bad_group_attention_plans_are_refused():
    from atlasvid_dist.config.method import AtlasConfig
    from atlasvid_dist.models.rope import Rotary3D
    from atlasvid_dist.parallel.window_group import GroupedWindowAttention

    cfg = AtlasConfig(window=(3, 4, 8))
    grid = Grid(3, 16, 16)
    sharding = shard_windows(WindowSpec(grid, (3, 4, 8), (0, 0, 0)), 1)
    lay = group_layout(sharding, 0, 4)
    with pytest.raises(PlanError, match="does not divide the model's 2 heads"):
        GroupedWindowAttention(cfg, grid, Rotary3D(12), sharding, lay, 2, "cpu")
    with pytest.raises(ConfigError, match="window_parallel"):
        GroupedWindowAttention(
            cfg, grid, Rotary3D(12), sharding, group_layout(sharding, 0, 2), 2, "cpu", window_parallel="ring"
        )
