"""Start-up and placement of a distributed run: Ray (embedded or joined), the cluster's capacity, the placement
group, the actors, and the calls into them with timeouts that name the worker.

    started = start_ray(ray, address, workers, device)       # True: this run started Ray and stops it
    with placement(ray, calls, workers, cuda) as pg:
        actors = start_actors(ray, pg, ActorSettings(...))
        check_devices(calls, actors)

Also the ranks' scratch folder (:func:`rank_scratch`) and the fault-injection test hook (:func:`fault_injection`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, PlanError, RunFailure, check


@dataclass(frozen=True)
class RayCalls:
    """Calls into actors that wait at most ``timeout_s`` and fail (RunFailure) naming what did not answer."""

    ray: object
    """The ``ray`` module (or a stand-in with its API)."""
    timeout_s: float
    """Seconds one call may take."""

    def call(self, method, what: str, *args):
        """Call an actor method, waiting while the actor restarts (it is unavailable meanwhile)."""
        ray = self.ray
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get(method.remote(*args), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError as exc:
                if time.monotonic() > deadline:
                    raise RunFailure(f"{what}: the worker did not come back within {self.timeout_s:g} s") from exc
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError as exc:
                raise RunFailure(f"{what} did not answer within {self.timeout_s:g} s") from exc
            except ray.exceptions.RayError as exc:
                raise RunFailure(f"{what} failed: {exc}") from exc

    def ready(self, ref) -> bool:
        """True when ``ref`` is ready within the timeout."""
        ready, _ = self.ray.wait([ref], timeout=self.timeout_s)
        return bool(ready)

    def wait(self, ref, what: str):
        """The value of ``ref``; RunFailure naming ``what`` when it is late or failed."""
        if not self.ready(ref):
            raise RunFailure(f"{what} did not finish within {self.timeout_s:g} s")
        return self.get(ref, what)

    def get(self, ref, what: str):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            raise RunFailure(f"{what} failed: {exc}") from exc


# -- Ray and the cluster ----------------------------------------------------------------------------------------------
def start_ray(ray, address: str | None, workers: int, device: str) -> bool:
    """Join ``address`` or start Ray embedded (on loopback, one retry: ``local.init_with_retry``); True when this
    call started it (and must stop it)."""
    from .local import LOOPBACK, embedded, init_with_retry

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every rank's lines, not "[repeated 3x across cluster]"
    if not embedded(address):  # `ray job submit`: RAY_ADDRESS is the job's own cluster
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return True
    gpus = workers if device == "cuda" else 0
    init_with_retry(
        lambda: ray.init(
            address="local",
            num_cpus=workers,
            num_gpus=gpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            log_to_driver=True,
            configure_logging=False,
        ),
        cleanup=ray.shutdown,
    )
    _warn_off_loopback(ray.util.get_node_ip_address())
    return True


def _warn_off_loopback(node_ip: str) -> None:
    from .local import is_loopback

    if not is_loopback(node_ip):
        import logging

        logging.getLogger("atlasvid_dist.runtime").warning(
            "embedded Ray runs on %s, not 127.0.0.1 (ray was imported before the run could keep it on "
            "loopback); its ports listen there (docs/security.md)",
            node_ip,
        )


def check_capacity(ray, bundle: dict, workers: int) -> None:
    """Refuse at once (PlanError) a placement group the cluster can never hold, instead of waiting for it."""
    total = ray.cluster_resources()
    for name, per in bundle.items():
        need, have = per * workers, total.get(name, 0.0)
        if have < need:
            raise PlanError(
                f"{workers} workers need {need:g} {name} in all; the Ray cluster has {have:g} "
                f"({total}); use fewer workers or add nodes"
            )


def cluster_gpu_name(ray, workers: int) -> str:
    """The GPUs of a joined cluster: PlanError when it holds fewer than ``workers`` (asked of Ray, not of this
    process, which may have none); else their name from Ray's ``accelerator_type:`` resources."""
    check_capacity(ray, {"GPU": 1.0}, workers)
    return " ".join(sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:")))


def one_node(ray) -> bool:
    """True when the Ray cluster is this one machine (every rank can rendezvous on loopback)."""
    return len([n for n in ray.nodes() if n.get("Alive")]) == 1


@contextlib.contextmanager
def placement(ray, calls: RayCalls, workers: int, cuda: bool):
    """A PACK placement group of one bundle per worker (1 CPU, and 1 GPU on CUDA), removed when the block ends;
    PlanError when the cluster cannot hold it or it is not reserved within the timeout."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": 1.0, **({"GPU": 1.0} if cuda else {})}
    check_capacity(ray, bundle, workers)
    pg = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    if not calls.ready(pg.ready()):
        remove_placement_group(pg)
        raise PlanError(
            f"placement group of {workers} bundles {bundle} could not be reserved within "
            f"{calls.timeout_s:g} s (cluster resources: {ray.cluster_resources()})"
        )
    try:
        yield pg
    finally:
        remove_placement_group(pg)


# -- the actors -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActorSettings:
    """What the actors of one run are built with."""

    cfg: object
    """The run's GenerateConfig."""
    plan: object
    """The run's ParallelPlan."""
    ckpt_dir: str
    """Folder every worker commits its steps to."""
    max_restarts: int
    """Restarts Ray allows each detail worker."""
    fault: tuple[int | str, int] | None = None
    """ATLASVID_FAULT_INJECT (:func:`fault_injection`)."""


@dataclass(frozen=True)
class Actors:
    """The handles of one run's workers."""

    proxy: object
    """The proxy worker (text + stage 1)."""
    ranks: list
    """The detail workers, by rank."""

    def named(self) -> list[tuple[str, object]]:
        """(role, actor) of every worker, as error messages name them."""
        return [("proxy worker", self.proxy)] + [(f"detail rank {r}", a) for r, a in enumerate(self.ranks)]


def start_actors(ray, pg, s: ActorSettings) -> Actors:
    """The proxy worker (sharing bundle 0) and one detail worker per bundle, half a bundle each."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .actors import DetailWorker, ProxyWorker

    cuda, plan, fault = s.cfg.device == "cuda", s.plan, s.fault

    def on(i, share, restarts=0):
        return dict(
            num_cpus=share,
            num_gpus=share if cuda else 0,
            max_restarts=restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        )

    # a crashed proxy worker is restarted by Ray and its task retried: it resumes stage 1 from its checkpoint
    proxy = (
        ray.remote(ProxyWorker)
        .options(**on(0, 0.5, 1), max_task_retries=1)
        .remote(s.cfg, s.ckpt_dir, fault[1] if fault and fault[0] == "proxy" else None)
    )
    # two threads: progress() answers while run() works
    ranks = [
        ray.remote(DetailWorker)
        .options(**on(r, 0.5, s.max_restarts), max_concurrency=2)
        .remote(
            s.cfg,
            r,
            plan.workers,
            s.ckpt_dir,
            fault[1] if fault and fault[0] == r else None,
            plan,
        )
        for r in range(plan.workers)
    ]
    return Actors(proxy, ranks)


def check_devices(calls: RayCalls, actors: Actors) -> None:
    """Every worker runs on the run's device: RunFailure (exit 1) naming each worker (and its node) that
    cannot, e.g. a --gpus worker whose torch finds no CUDA device."""
    problems = [calls.call(a.device_check, f"{role} (device check)") for role, a in actors.named()]
    problems = [p for p in problems if p]
    if problems:
        raise RunFailure("; ".join(problems))


# -- the ranks' scratch folder and the fault hook ---------------------------------------------------------------------
SCRATCH_PREFIX = "atlasvid-ranks-"
"""Temporary ranks' folders (runs without --run-dir) are named SCRATCH_PREFIX + driver pid + '-' + random."""


@contextlib.contextmanager
def rank_scratch(run_dir: str | None, base: str | None = None):
    """The folder the ranks commit their steps to: the run folder when there is one; otherwise a temporary folder
    (in ``base``, default the system temp folder) removed when the block ends and, failing that, at interpreter
    exit. Folders of earlier drivers that died (killed: no cleanup ran) are removed first."""
    if run_dir:
        yield run_dir
        return
    remove_stale_scratch(base)
    path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=base)
    cleanup = functools.partial(shutil.rmtree, path, ignore_errors=True)
    atexit.register(cleanup)
    try:
        yield path
    finally:
        cleanup()
        atexit.unregister(cleanup)


def remove_stale_scratch(base: str | None = None) -> list[Path]:
    """Remove temporary ranks' folders in ``base`` (default: the system temp folder) whose driver is not alive."""
    from ..pipeline.outputs import pid_alive

    removed = []
    pattern = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}(\d+)-")
    for p in Path(base or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def fault_injection(workers: int) -> tuple[int | str, int] | None:
    """ATLASVID_FAULT_INJECT=RANK:STEP (a test hook): that rank's worker exits abruptly after committing that
    stage-2 step, the first time only; ``proxy:STEP`` does the same to the proxy worker in stage 1. None when
    unset."""
    raw = os.environ.get("ATLASVID_FAULT_INJECT", "").strip()
    if not raw:
        return None
    parts = [p.strip() for p in raw.split(":")]
    if len(parts) != 2 or not (parts[0].isdigit() or parts[0] == "proxy") or not parts[1].isdigit():
        raise ConfigError("ATLASVID_FAULT_INJECT", raw, "must be RANK:STEP or proxy:STEP (integers >= 0)")
    step = int(parts[1])
    if parts[0] == "proxy":
        return "proxy", step
    rank = int(parts[0])
    check(rank < workers, "ATLASVID_FAULT_INJECT", raw, f"rank must be < workers = {workers}")
    return rank, step
