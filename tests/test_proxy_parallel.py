"""Stage 1 over ranks (--proxy-parallel): Ulysses and ring give the one-process proxy on every rank; bad splits are
refused before any communication."""

import pytest

from atlasvid_dist.errors import PlanError
from atlasvid_dist.runtime.proxy import check_proxy_split

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
)  # proxy: 128 tokens, the tiny model: 2 heads


def _config():
    from atlasvid_dist.cli.generate import DEFAULTS, build_config

    return build_config({**DEFAULTS, **VALUES})


def _proxy_on_rank(rank, world, mode):
    from atlasvid_dist.parallel.comm import CommStats
    from atlasvid_dist.pipeline.generate import TwoStageGenerator
    from atlasvid_dist.runtime.proxy import denoise_proxy_rank

    gen = TwoStageGenerator(_config(), progress=False)
    comp = gen.load()
    text = gen.encode(comp)
    stats = CommStats()
    got = denoise_proxy_rank(gen, comp, text, rank, world, mode, None, stats, timeout=60)
    want = gen.stage1(comp, text, None, None)
    return float((got - want).abs().max()), tuple(got.shape), stats.total(), float(want.abs().max())


@pytest.mark.slow  # spawns 2-4 gloo processes
@pytest.mark.parametrize("mode,world", [("ulysses", 2), ("ring", 2), ("ring", 4)])
def test_proxy_over_ranks_equals_one_process(mode, world):
    out = run_ranks(_proxy_on_rank, world, mode, timeout=120)
    for diff, _shape, sent, scale in out:
        assert scale > 0.1 and diff <= 1e-5, (diff, scale)
        assert sent > 0
    assert len({o[1] for o in out}) == 1  # every rank holds the whole proxy


def test_bad_proxy_splits_are_refused():
    with pytest.raises(PlanError, match="do not split into 3 equal slices"):
        check_proxy_split(128, 2, 3, "ring")
    with pytest.raises(PlanError, match="2 heads do not split over 4 ranks"):
        check_proxy_split(128, 2, 4, "ulysses")
    check_proxy_split(128, 2, 4, "ring")
