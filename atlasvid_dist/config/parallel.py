"""ParallelPlan: how one run is spread over ranks (detail workers, stage-1 sequence parallelism, split windows).

It checks itself when built (degrees are integers, their products divide the worker count, no more workers than
GPUs) and prints every factor when it refuses. What needs the model or the window grid is checked by
:meth:`ParallelPlan.check_against`, before any model loads; the cost model estimates any plan that passes it.
What the distributed runtime runs is narrower: :meth:`ParallelPlan.check_runnable` adds its refusals (ring inside
a split window; a proxy that does not split over the ranks), and the runtime calls those same checks before any
actor starts. Suggestions printed here and by ``plan`` name only plans that pass them. No torch.distributed here:
this is arithmetic.

Layout of the ranks (docs/distribution.md):

* stage 1 (proxy): ``proxy_parallel`` = 'none' runs the proxy on one rank; 'ulysses' / 'ring' spread its sequence
  over ``proxy_degree`` ranks (Ulysses all-to-all over heads, or a ring pass of keys/values);
* stage 2 (detail), full attention: the whole sequence is split over all workers with ``window_parallel``;
* stage 2 (detail), windows: the windows are cut into ``num_window_groups = workers / window_group`` contiguous blocks,
  one per group, in the ownership order ``window_order`` ('thw': time slabs; 'wht': column slabs across all
  time); a group of ``window_group`` > 1 ranks splits each of its windows with ``window_parallel``;
* nodes: ranks r and r' share a node (NVLink) when r // gpus_per_node == r' // gpus_per_node; others talk over
  InfiniBand (the cost model prices the two links apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import ConfigError, PlanError, check
from ..geometry.grid import divisors
from ..parallel.sharding import SHIFT_EXCHANGES, WINDOW_ORDERS
from .model import ModelSpec

Device = Literal["cpu", "cuda"]
ProxyParallel = Literal["none", "ulysses", "ring"]
WindowParallel = Literal["ulysses", "ring"]
DEVICES, PROXY_PARALLEL, WINDOW_PARALLEL = (get_args(t) for t in (Device, ProxyParallel, WindowParallel))
RUNTIME_WINDOW_PARALLEL = ("ulysses",)
"""How the distributed runtime shares a split window (ring inside windows is costed, not implemented)."""
RUNTIME_PROXY_PARALLEL = ("ulysses", "ring")
"""Stage-1 sequence parallelism the runtime runs (over all workers)."""


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        name,
        value,
        f"must be an integer >= {minimum}",
    )


@dataclass(frozen=True)
class ParallelPlan:
    """Ranks and degrees of one run; validates itself on creation."""

    workers: int = 1
    """Detail ranks (one process each; one GPU each on CUDA)."""
    device: Device = "cpu"
    """'cpu' (gloo, local processes) or 'cuda' (NCCL, one GPU per worker)."""
    gpus: int = 0
    """GPUs available to the run (0 on CPU)."""
    proxy_parallel: ProxyParallel = "none"
    """Stage-1 sequence parallelism: 'none' (one rank), 'ulysses' (all-to-all over heads) or 'ring'."""
    ulysses_degree: int = 1
    """Stage-1 ranks sharing the proxy sequence with Ulysses (must divide the heads)."""
    ring_degree: int = 1
    """Stage-1 ranks sharing the proxy sequence with ring attention."""
    window_group: int = 1
    """Ranks per window when a window is split (1 = every rank owns whole windows)."""
    window_parallel: WindowParallel = "ulysses"
    """How a split window is shared by its group: 'ulysses' (heads) or 'ring' (keys/values)."""
    window_order: str = "auto"
    """Ownership order of the window blocks (window axes, slowest first): 'thw' = time slabs, 'wht' = column slabs
    across all time (a shift in time then stays inside a rank's slab), or any other order of the three axes;
    'auto' = the order whose halo the cost model prices cheapest for the run (``cost.model.choose_window_order``;
    plan prints the choice and the halo of 'thw' and 'wht')."""
    shift_exchange: str = "auto"
    """How a shifted layer gets the tokens of windows that straddle ranks: 'kv' (fetch the other tokens' keys and
    values: a halo, both ways), 'rows' (give each shifted window whole to the rank holding most of it and move the
    residual rows of its other tokens there and back: one D-wide row one way instead of keys and values; one
    window group per window only) or 'auto' (the cheaper of the two in the cost model's link time, with the
    ownership order chosen alongside)."""
    gpus_per_node: int = 8
    """Ranks per node: halo traffic between ranks of one node goes over NVLink, across nodes over InfiniBand."""

    def __post_init__(self) -> None:
        _positive_int("workers", self.workers)
        check(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        _positive_int("gpus", self.gpus, minimum=0)
        check(
            self.proxy_parallel in PROXY_PARALLEL,
            "proxy_parallel",
            self.proxy_parallel,
            f"must be one of {PROXY_PARALLEL}",
        )
        for name in ("ulysses_degree", "ring_degree", "window_group"):
            _positive_int(name, getattr(self, name))
        check(
            self.window_parallel in WINDOW_PARALLEL,
            "window_parallel",
            self.window_parallel,
            f"must be one of {WINDOW_PARALLEL}",
        )
        check(
            self.window_order in ("auto", *WINDOW_ORDERS),
            "window_order",
            self.window_order,
            f"must be 'auto' or one of {WINDOW_ORDERS} (window axes, slowest first)",
        )
        check(
            self.shift_exchange in ("auto", *SHIFT_EXCHANGES),
            "shift_exchange",
            self.shift_exchange,
            f"must be 'auto' or one of {SHIFT_EXCHANGES}",
        )
        if self.window_group > 1:
            check(
                self.shift_exchange != "rows",
                "shift_exchange",
                self.shift_exchange,
                "'rows' moves whole windows between ranks; with window_group > 1 a window is split: use 'kv'",
            )
        _positive_int("gpus_per_node", self.gpus_per_node)
        if self.device == "cuda":
            check(self.gpus >= 1, "gpus", self.gpus, "device 'cuda' needs at least one GPU")
            check(
                self.workers <= self.gpus,
                "workers",
                self.workers,
                f"more workers than GPUs: workers = {self.workers} > gpus = {self.gpus} (one GPU per worker)",
            )
        self._check_proxy_degrees()
        check(
            self.workers % self.window_group == 0,
            "window_group",
            self.window_group,
            f"must divide workers: workers = {self.workers} is not num_window_groups x window_group "
            f"(window_group = {self.window_group}; divisors of {self.workers}: {divisors(self.workers)})",
        )

    def _check_proxy_degrees(self) -> None:
        u, r, mode = self.ulysses_degree, self.ring_degree, self.proxy_parallel
        if mode == "none":
            check(
                u == 1 and r == 1,
                "proxy_parallel",
                mode,
                f"'none' runs stage 1 on one rank, but ulysses_degree = {u} and ring_degree = {r} (both must be "
                f"1); choose 'ulysses' or 'ring'",
            )
        elif mode == "ulysses":
            check(r == 1, "ring_degree", r, "must be 1 with proxy_parallel='ulysses'")
        else:
            check(u == 1, "ulysses_degree", u, "must be 1 with proxy_parallel='ring'")
        check(
            self.workers % (u * r) == 0,
            "proxy_degree",
            u * r,
            f"ulysses_degree ({u}) x ring_degree ({r}) = {u * r} must divide workers = {self.workers}",
        )

    @property
    def proxy_degree(self) -> int:
        """Ranks sharing the stage-1 sequence (ulysses_degree x ring_degree)."""
        return self.ulysses_degree * self.ring_degree

    @property
    def num_window_groups(self) -> int:
        """Blocks the detail windows are cut into (workers / window_group)."""
        return self.workers // self.window_group

    def check_against(self, model: ModelSpec, num_windows: int | None) -> None:
        """Refuse (PlanError), with every factor printed, a plan that the model's heads or the windows cannot carry.

        ``num_windows`` is the base window count of the detail grid, or None for full attention (no windows).
        """
        u, g, num_heads = self.ulysses_degree, self.window_group, model.num_heads
        if num_heads % u:
            raise PlanError(
                f"ulysses_degree = {u} does not divide the model's heads = {num_heads}: Ulysses gives "
                f"each rank heads / ulysses_degree heads; use --proxy-parallel ring, or a worker count "
                f"dividing {num_heads} ({divisors(num_heads)}: the runtime runs stage 1 over all workers)"
            )
        if g > 1 and self.window_parallel == "ulysses" and num_heads % g:
            raise PlanError(
                f"window_group = {g} does not divide the model's heads = {num_heads} (window_parallel "
                f"'ulysses' splits heads); use a window group dividing both {num_heads} and workers = "
                f"{self.workers} ({[d for d in divisors(num_heads) if self.workers % d == 0]})"
            )
        if num_windows is None and self.window_parallel == "ulysses" and num_heads % self.workers:
            raise PlanError(
                f"full attention splits the whole sequence over workers = {self.workers} with Ulysses, "
                f"which must divide the model's heads = {num_heads}; use a worker count dividing "
                f"{num_heads} ({divisors(num_heads)})"
            )
        if num_windows is not None and self.num_window_groups > num_windows:
            raise PlanError(
                f"{self.num_window_groups} window groups (workers = {self.workers} / window_group = "
                f"{g}) but only {num_windows} windows: every group needs at least one window; use "
                f"fewer workers, smaller windows, or a window_group of at least "
                f"{-(-self.workers // num_windows)} to split windows"
            )

    def check_runnable(self, model: ModelSpec, num_windows: int | None, proxy_tokens: int | None) -> None:
        """:meth:`check_against`, then what the distributed runtime refuses besides (ConfigError / PlanError):
        ring inside a split window, and a proxy of ``proxy_tokens`` (None: no proxy stage) that stage 1 cannot
        split over the workers."""
        self.check_against(model, num_windows)
        self.check_window_split()
        if proxy_tokens is not None:
            self.check_proxy_split(proxy_tokens, model.num_heads)

    def check_window_split(self) -> None:
        """The runtime shares a split window with Ulysses only (ConfigError naming window_parallel otherwise)."""
        if self.window_group > 1:
            check(
                self.window_parallel in RUNTIME_WINDOW_PARALLEL,
                "window_parallel",
                self.window_parallel,
                "only 'ulysses' splits a window over a group (ring inside windows is not implemented)",
            )

    def check_proxy_split(self, tokens: int, heads: int) -> None:
        """With stage 1 over the ranks: the proxy's ``tokens`` (and, for Ulysses, ``heads``) split over every
        worker (:func:`check_proxy_split`); nothing to check with ``proxy_parallel='none'``."""
        if self.proxy_parallel != "none":
            check_proxy_split(tokens, heads, self.workers, self.proxy_parallel)

    def describe(self) -> str:
        """One line with every factor, e.g. for logs and the plan table."""
        proxy = "1 rank" if self.proxy_parallel == "none" else f"{self.proxy_parallel} x{self.proxy_degree}"
        return (
            f"{self.workers} worker(s) on {self.device}"
            + (f" ({self.gpus} GPUs)" if self.device == "cuda" else "")
            + f"; stage 1: {proxy}; stage 2: {self.num_window_groups} window group(s) x {self.window_group} "
            f"rank(s)"
            + (f" ({self.window_parallel} inside a window)" if self.window_group > 1 else "")
            + f", ownership {self.window_order}, shifted layers by {self.shift_exchange}"
            + (f"; {self.gpus_per_node} GPUs per node" if self.workers > self.gpus_per_node else "")
        )


def check_proxy_split(tokens: int, heads: int, world: int, mode: str) -> None:
    """Refuse (before any actor starts) a proxy of ``tokens`` that does not split into ``world`` equal slices, or
    ``heads`` that Ulysses cannot split; the alternatives it names pass this check."""
    if mode not in RUNTIME_PROXY_PARALLEL:
        raise ConfigError("proxy_parallel", mode, f"must be one of {RUNTIME_PROXY_PARALLEL} to run stage 1 over ranks")
    if tokens % world:
        fits = [d for d in range(1, min(tokens, 64) + 1) if tokens % d == 0]
        raise PlanError(
            f"--proxy-parallel {mode}: the proxy's {tokens} tokens do not split into {world} equal "
            f"slices; use a worker count dividing {tokens} (e.g. {fits}) or --proxy-parallel none"
        )
    if mode == "ulysses" and heads % world:
        raise PlanError(
            f"--proxy-parallel ulysses: the model's {heads} heads do not split over {world} ranks; "
            f"use --proxy-parallel ring or a worker count dividing {heads}"
        )


def runnable_proxy_parallel(tokens: int, heads: int, world: int) -> list[str]:
    """The stage-1 modes the runtime runs over ``world`` ranks for this proxy (empty: none splits it)."""
    out = []
    for mode in RUNTIME_PROXY_PARALLEL:
        try:
            check_proxy_split(tokens, heads, world, mode)
        except (ConfigError, PlanError):
            continue
        out.append(mode)
    return out
