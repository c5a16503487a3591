"""`plan --plot`: a PNG with the window-to-rank layout and the cost breakdown; the layout follows the sharding."""

import numpy as np
import pytest
from typer.testing import CliRunner

from atlasvid_dist.cli.main import app
from atlasvid_dist.cli.plot import window_owner_grid
from atlasvid_dist.geometry import Grid, WindowSpec


def test_plot_writes_png(tmp_path):
    out = tmp_path / "plan.png"
    r = CliRunner().invoke(app, ["plan", "--model", "wan2.1-1.3b", "--res", "4k", "--gpus", "8", "--plot", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_bad_path_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["plan", "--res", "720p", "--plot", str(tmp_path / "nope" / "x.png")])
    assert r.exit_code == 2


@pytest.mark.parametrize("ranks", [1, 3, 8])
def test_owner_grid_is_balanced_contiguous_blocks(ranks):
    spec = WindowSpec(Grid(21, 45, 80), (3, 15, 16))
    owner = window_owner_grid(spec, ranks).reshape(-1)
    assert (np.diff(owner) >= 0).all() and set(owner) == set(range(ranks))  # contiguous, window-major
    counts = np.bincount(owner)
    assert counts.max() - counts.min() <= 1
