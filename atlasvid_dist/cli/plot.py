"""`plan --plot FILE.png`: the window-to-rank layout and the cost breakdown as pictures (matplotlib, optional)."""

from __future__ import annotations

import errno
import math
import tempfile
from pathlib import Path

import numpy as np

from ..cost.model import CostReport
from ..errors import ConfigError
from ..geometry.windows import WindowSpec


def window_owner_grid(spec: WindowSpec, ranks: int, order: str = "thw") -> np.ndarray:
    """(ct, ch, cw) rank that owns each base window (blocks in the ownership order, as parallel.sharding cuts
    them)."""
    from ..parallel.sharding import shard_windows

    return shard_windows(spec, ranks, order).window_owner.numpy().reshape(spec.counts)


def check_plot_path(path: str) -> Path:
    """Refuse (ConfigError) a --plot destination that cannot be written: not .png, a folder that does not exist,
    or one where a file cannot be created (read-only), or no matplotlib. Called before the plan is computed."""
    _pyplot(path)
    out = Path(path)
    if out.suffix.lower() != ".png" or not out.parent.resolve().is_dir():
        raise ConfigError("plot", path, "must be a .png in an existing folder")
    if out.is_dir():
        raise ConfigError("plot", path, "is a folder; give a FILE.png")
    try:  # the one reliable test (root ignores permission bits, a read-only mount does not)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".plot-check-", suffix=".png"):
            pass
    except OSError as exc:
        raise ConfigError("plot", path, folder_write_rule(out.parent, exc)) from None
    return out


def folder_write_rule(folder: Path, exc: OSError) -> str:
    """The rule a failed write into ``folder`` broke, from its errno (read-only, permission, full disk...)."""
    reasons = {
        errno.EROFS: "is on a read-only file system",
        errno.EACCES: "is not writable (permission denied)",
        errno.EPERM: "is not writable (operation not permitted)",
        errno.ENOSPC: "has no space left on device",
    }
    return f"folder {folder} {reasons.get(exc.errno, f'cannot be written: {exc.strerror or exc}')}"


def save_plan_plot(path: str, report: CostReport, spec: WindowSpec | None, ranks: int, order: str = "thw") -> Path:
    out = check_plot_path(path)
    plt = _pyplot(path)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    _layout(axes[0], spec, ranks, order)
    _bars(axes[1], report.flops_per_video, "FLOPs per video", 1e15, "PFLOP")
    mem = max(report.memory.values(), key=lambda d: d.get("total", 0))
    _bars(axes[2], mem, "memory per rank (peak phase)", 2**30, "GiB")
    fig.suptitle(
        f"detail {report.detail_tokens:,} tokens, proxy {report.proxy_tokens:,}; attention FLOPs "
        f"{report.attention_flops_ratio:.0f}x fewer than full; fits: {report.fits}"
    )
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise ConfigError("plot", path, folder_write_rule(out.parent, exc)) from None
    finally:
        plt.close(fig)
    return out


def _pyplot(path: str):
    """matplotlib.pyplot on the Agg backend, or a ConfigError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plot", path, "needs matplotlib: pip install 'atlasvid-dist[plot]'") from None
    return plt


def _layout(ax, spec: WindowSpec | None, ranks: int, order: str = "thw") -> None:
    if spec is None:
        ax.text(0.5, 0.5, "full attention: no windows", ha="center", va="center")
        ax.set_axis_off()
        return
    owner = window_owner_grid(spec, ranks, order)  # (ct, ch, cw)
    ct = owner.shape[0]
    cols = min(ct, 8)
    rows = math.ceil(ct / cols)
    ch, cw = owner.shape[1:]
    canvas = np.full((rows * (ch + 1), cols * (cw + 1)), np.nan)
    for t in range(ct):
        r, c = divmod(t, cols)
        canvas[r * (ch + 1) : r * (ch + 1) + ch, c * (cw + 1) : c * (cw + 1) + cw] = owner[t]
    im = ax.imshow(canvas, cmap="tab20" if ranks <= 20 else "viridis", interpolation="nearest")
    ax.set_title(
        f"window -> rank: {spec.num_windows} windows of {spec.window} tokens, {ranks} ranks\n"
        f"(one panel per block of {spec.window[0]} latent frames)",
        fontsize=9,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.figure.colorbar(im, ax=ax, fraction=0.03, label="rank")


def _bars(ax, parts: dict, title: str, unit: float, label: str) -> None:
    items = [(k, v) for k, v in parts.items() if k != "total" and isinstance(v, (int, float)) and v > 0]
    ax.barh([k for k, _ in items], [v / unit for _, v in items])
    ax.set_title(f"{title}: total {parts.get('total', sum(v for _, v in items)) / unit:,.2f} {label}", fontsize=9)
    ax.set_xlabel(label)
