"""The driver of a distributed generation on Ray: plan checks, placement group, actors, gather, decode.

    result = DistributedGenerator(cfg, workers=3).run()

With no ``ray_address`` Ray starts embedded in this process (loopback, only the resources the run needs) and
stops at the end; ``ray_address='auto'`` or an address joins an existing cluster. A placement group reserves one
bundle per detail worker (PACK: within as few nodes as possible); the proxy worker shares bundle 0 with detail
rank 0 (half of its CPU / GPU) and is gone before stage 2 starts. The clean proxy and the text embeddings reach
every detail worker once through the object store. The detail ranks form a gloo (CPU) or NCCL (CUDA) group, run
stage 2 on their own windows, and return their tokens; the driver reassembles the latents, puts them once in the
object store, and every rank decodes its share of the spatial tiles (``decode.py``) as a Ray streaming generator;
the driver blends the chunks and writes the mp4 in frame order (one writer; no collective in the decode).

This module orchestrates; the parts are ``cluster.py`` (Ray, capacity, placement group, actors), ``supervisor.py``
(stage 2: launch, restarts, progress, collection) and ``decode.py`` (:class:`~.decode.RankDecoder`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from ..config.generate import GenerateConfig
from ..errors import PlanError, check
from .cluster import (
    SCRATCH_PREFIX,
    ActorSettings,
    RayCalls,
    check_devices,
    cluster_gpu_name,
    fault_injection,
    placement,
    rank_scratch,
    remove_stale_scratch,
    start_actors,
    start_ray,
)
from .results import ProxyResult, RankResult, rank_peaks

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SCRATCH_PREFIX",
    "DistributedGenerator",
    "DistributedResult",
    "fault_injection",
    "rank_scratch",
    "remove_stale_scratch",
]

#: seconds a rank may wait in one collective / rendezvous before the run fails naming it
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class DistributedResult:
    """A RunResult plus what the distribution did."""

    result: object
    """pipeline.generate.RunResult of the run."""
    workers: int
    """Detail ranks."""
    bytes_sent: list[int] = field(default_factory=list)
    """Bytes every rank sent to other ranks in stage 2 (index = rank; after a restart: since the resume)."""
    bytes_per_layer: list[dict[int, int]] = field(default_factory=list)
    """Per rank: bytes sent by layer (unshifted layers send 0)."""
    tokens: list[int] = field(default_factory=list)
    """Detail tokens every rank owns."""
    restarted: list[int] = field(default_factory=list)
    """Ranks whose worker died and was restarted (once per restart)."""
    bytes_per_step: list[int] = field(default_factory=list)
    """Bytes every rank sent per denoising step (cond + uncond passes)."""
    proxy_resumed: int | None = None
    """When the proxy worker died and was restarted: the stage-1 step it resumed from (0: from noise)."""
    proxy_bytes: list[int] = field(default_factory=list)
    """--proxy-parallel: bytes every rank sent in stage 1 (sequence parallelism and the final all-gather)."""
    tiles: list[int] = field(default_factory=list)
    """Decode tiles every rank decoded (the output video)."""
    step_seconds: list[float] = field(default_factory=list)
    """Median seconds of one stage-2 step (checkpoint commit included), by rank."""
    planned_bytes_per_step: int | None = None
    """The cost model's bytes per denoising step of the heaviest rank for this run (the pre-flight's figure, which
    ``plan`` prints): the counted ``bytes_per_step`` reach it exactly."""
    planned_memory: dict = field(default_factory=dict)
    """The pre-flight's memory of the heaviest rank by phase (bytes; what ``plan`` prints), to hold the measured
    ``peak_memory`` against (``benchmarks/bench_memory.py``)."""

    def to_dict(self) -> dict:
        """The run's machine-readable summary (``RunResult.to_dict``) with the distribution's numbers by rank."""
        return {
            **self.result.to_dict(),
            "workers": self.workers,
            "bytes_sent": list(self.bytes_sent),
            "bytes_sent_per_step": list(self.bytes_per_step),
            "proxy_bytes_sent": list(self.proxy_bytes),
            "tokens": list(self.tokens),
            "decode_tiles": list(self.tiles),
            "median_step_seconds_by_rank": list(self.step_seconds),
            "planned_bytes_sent_per_step": self.planned_bytes_per_step,
            "planned_memory_by_phase": {k: v["total"] for k, v in self.planned_memory.items()},
            "restarted": list(self.restarted),
        }

    def summary(self) -> str:
        per_step = self.bytes_per_step or [0] * len(self.bytes_sent)
        sent = ", ".join(
            f"rank {r}: {b / 1e6:.3f} MB, {s / 1e6:.3f} MB/step"
            for r, (b, s) in enumerate(zip(self.bytes_sent, per_step))
        )
        restarts = "".join(f"; worker of rank {r} was restarted" for r in self.restarted)
        if self.proxy_resumed is not None:
            restarts += f"; proxy worker was restarted and resumed stage 1 from step {self.proxy_resumed}"
        proxy = ""
        if any(self.proxy_bytes):
            proxy = "; stage 1 on all ranks, bytes sent " + ", ".join(
                f"rank {r}: {b / 1e6:.3f} MB" for r, b in enumerate(self.proxy_bytes)
            )
        tiles = f"; decode tiles per rank {self.tiles}" if self.tiles else ""
        planned = ""
        if self.planned_bytes_per_step is not None:
            planned = f", planned {self.planned_bytes_per_step / 1e6:.3f} MB/step on the heaviest rank"
        if self.step_seconds:
            tiles += "; s/step per rank [" + ", ".join(f"{x:.3f}" for x in self.step_seconds) + "]"
        return (
            f"{self.result.summary()}\n{self.workers} detail workers; tokens per rank {self.tokens}; "
            f"bytes sent per rank ({sent}){planned}{proxy}{tiles}{restarts}"
        )


class DistributedGenerator:
    """Runs one GenerateConfig over ``workers`` detail actors (see the module docstring)."""

    def __init__(
        self,
        cfg: GenerateConfig,
        workers: int,
        ray_address: str | None = None,
        progress: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_restarts: int = 2,
        plan=None,
    ):
        from ..config.parallel import ParallelPlan

        check(
            isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1,
            "workers",
            workers,
            "must be an integer >= 1",
        )
        if plan is None:
            plan = ParallelPlan(workers=workers, device=cfg.device, gpus=workers if cfg.device == "cuda" else 0)
        check(plan.workers == workers, "plan.workers", plan.workers, f"must equal workers = {workers}")
        self.plan = plan
        self.cfg, self.workers, self.address, self.progress = cfg, workers, ray_address, progress
        self.timeout_s = timeout_s
        self.sharding = None
        self.max_restarts = max_restarts
        self.restarted: list[int] = []
        self.proxy_resumed: int | None = None
        self.resume = False
        self.tiles: list[int] = []
        self.decode_peaks: list[dict] = []
        """Every rank's process peaks after the decode (``report.peak_memory``)."""
        self.report = None
        """The pre-flight's cost-model report of this run (set before any actor starts)."""
        self.stores: list[str] = []
        """Rendezvous init methods of this run (file stores are removed at its end)."""

    # ------------------------------------------------------------------------------------------------ checks
    def preflight(self) -> None:
        """Refuse bad plans before any actor starts (PlanError / ConfigError, exit code 2)."""
        from ..parallel.window_attention import shard_for
        from .detail import check_supported

        check_supported(self.cfg)
        if self.cfg.device == "cuda" and self.address is None and not os.environ.get("RAY_ADDRESS"):
            have = torch.cuda.device_count()
            if self.workers > have:
                raise PlanError(f"--gpus {self.workers}: this machine has {have} CUDA device(s)")
        self._resolve_window_order()
        g = self.plan.window_group
        self.sharding = shard_for(self.cfg.method, self.cfg.detail_grid, self.workers // g, self.plan.window_order)
        self.plan.check_window_split()
        if g > 1:
            from ..parallel.window_group import group_layout

            self.layouts = [group_layout(self.sharding, r, g) for r in range(self.workers)]  # PlanError if too few
        self.fault = fault_injection(self.workers)

    def _resolve_window_order(self) -> None:
        """--window-order / --shift-exchange auto: the sharding the cost model prices cheapest (the plan every rank
        then gets)."""
        if "auto" in (self.plan.window_order, self.plan.shift_exchange):
            from ..cost.model import choose_sharding
            from ..pipeline.generate import TwoStageGenerator

            spec = TwoStageGenerator.model_spec_of(self.cfg.model)
            profile = self.cfg.device_profile
            if profile == "auto":  # only the links matter here: H100 and H200 nodes price them alike
                profile = "cpu" if self.cfg.device == "cpu" else "h100"
            self.plan = choose_sharding(self.cfg.video, spec, self.cfg.method, self.plan, profile)

    def _fit_check(self):
        """The cost model's fit verdict for this worker count (PlanError, exit 2, with the numbers)."""
        return self._gen.preflight(workers=self.workers, plan=self.plan)

    # ------------------------------------------------------------------------------------------------ run
    def run(self, resume: bool = False, overwrite: bool = False):
        """Generate; with the config's run_dir every rank's steps are committed there, and ``resume`` continues a
        run whose driver died from the newest step every rank committed (stage 1 from its own checkpoint);
        ``overwrite`` clears a previous run's folder first."""
        from ..pipeline.generate import TwoStageGenerator

        self.preflight()
        embedded = self._embedded()
        # a cluster's driver may be a CPU-only head: the GPUs (and the CUDA check) are the workers'
        gen = self._gen = TwoStageGenerator(self.cfg, progress=self.progress, local_device=embedded)
        if embedded:
            self._checks(resume, overwrite)
            from .local import loopback_ray_env

            loopback_ray_env()  # before `import ray`: Ray keeps 127.0.0.1 as the node address
        import ray

        started = start_ray(ray, self.address, self.workers, self.cfg.device)
        try:
            if not embedded:  # the fit check needs the cluster's GPUs: joining is not yet any work
                self._check_cluster(ray)
                self._checks(resume, overwrite)
            t0 = time.perf_counter()
            latents, parts, out_bytes = self._generate(ray)
            gen.seconds["distributed"] = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()
        return self._result(latents, parts, out_bytes)

    def _checks(self, resume: bool, overwrite: bool) -> None:
        """Everything refused before any actor starts: fit, outputs, the run folder, the proxy's split."""
        from ..pipeline.outputs import check_outputs

        self.report = self._fit_check()
        check_outputs(self.cfg)
        # the folder's manifest (run id, config checksum, worker count), checked or written
        sharding = {"window_group": self.plan.window_group, "window_order": self.plan.window_order}
        self._gen.checkpointer(resume, workers=self.workers, overwrite=overwrite, sharding=sharding)
        self.resume = resume
        if self.cfg.uses_proxy and self.plan.proxy_parallel != "none":
            self.plan.check_proxy_split(self.cfg.proxy.grid.size, self._gen.model_spec().num_heads)

    def _check_cluster(self, ray) -> None:
        """A joined cluster must hold the run's GPUs (PlanError naming what it needs and has); the GPUs' name
        (Ray's ``accelerator_type:`` resource) picks the 'auto' device profile."""
        if self.cfg.device == "cuda":
            self._gen.gpu_name = cluster_gpu_name(ray, self.workers)

    def _result(self, latents, parts: list[RankResult], out_bytes: int) -> DistributedResult:
        """The DistributedResult of a finished run from the ranks' reports."""
        from ..pipeline.generate import RunResult
        from ..pipeline.report import median

        gen = self._gen
        steps = {"proxy": median(gen.step_times.get("proxy", [])), "detail": median(p.step_seconds for p in parts)}
        result = RunResult.for_config(
            self.cfg,
            gen.seconds,
            out_bytes,
            step_seconds={k: v for k, v in steps.items() if v is not None},
            peak_memory=[rank_peaks(p, after) for p, after in zip(parts, self.decode_peaks or [{}] * len(parts))],
            detail_forwards=parts[0].detail_forwards,
        )
        return DistributedResult(
            result,
            self.workers,
            [p.sent for p in parts],
            [p.per_layer for p in parts],
            [p.tokens.shape[1] for p in parts],
            list(self.restarted),
            [p.sent_per_step for p in parts],
            self.proxy_resumed,
            [p.proxy_sent for p in parts],
            self.tiles,
            [p.step_seconds for p in parts],
            self.report.comm_bytes_per_step_per_rank["total"],
            self.report.memory,
        )

    def _embedded(self) -> bool:
        """True when this run starts (or found) Ray on this machine only (``local.embedded``)."""
        from .local import embedded

        return embedded(self.address)

    def _generate(self, ray):
        with rank_scratch(self.cfg.run_dir) as ckpt_dir:
            return self._generate_in(ray, ckpt_dir)

    def _generate_in(self, ray, ckpt_dir: str):
        """The run on the cluster; every rank's checkpoints go to ``ckpt_dir``."""
        from .decode import RankDecoder

        calls = RayCalls(ray, self.timeout_s)
        settings = ActorSettings(self.cfg, self.plan, ckpt_dir, self.max_restarts, self.fault)
        with placement(ray, calls, self.workers, self.cfg.device == "cuda") as pg:
            try:
                actors = start_actors(ray, pg, settings)
                check_devices(calls, actors)
                shared = self._stage1(ray, calls, actors.proxy)
                parts = self._stage2(ray, calls, actors.ranks, ray.put(shared.text))  # once, in the object store
                latents = self._assemble(parts)
                decoder = RankDecoder(ray, calls, actors.ranks, self._gen)
                proxy = shared.text.proxy if shared.text.proxy is not None else parts[0].proxy
                out_bytes = decoder.outputs(self.cfg, latents, proxy)
                self.tiles, self.decode_peaks = decoder.tiles, decoder.peaks
            finally:
                self._remove_stores()
        return latents, parts, out_bytes

    def _stage1(self, ray, calls: RayCalls, proxy_actor) -> ProxyResult:
        """Text (and stage 1 unless --proxy-parallel) on the proxy worker, which is then stopped."""
        stage1 = self.plan.proxy_parallel == "none"
        shared = calls.wait(
            proxy_actor.run.remote(stage1), "proxy worker (text + stage 1)" if stage1 else "proxy worker (text)"
        )
        ray.kill(proxy_actor)
        if shared.restarted:
            self.proxy_resumed = shared.resumed_step or 0
        for k in ("load", "text", "proxy"):  # the proxy actor's own stage times
            if k in shared.seconds:
                self._gen.seconds[k] = shared.seconds[k]
        self._gen.step_times["proxy"] = shared.step_times
        self._say_proxy_times(shared.seconds)
        return shared

    def _stage2(self, ray, calls: RayCalls, ranks: list, text_ref) -> list[RankResult]:
        """Stage 2 under a :class:`~.supervisor.Stage2Supervisor` (restarts recorded in :attr:`restarted`)."""
        from .supervisor import Stage2Supervisor

        sup = Stage2Supervisor(
            ray,
            calls,
            ranks,
            self.max_restarts,
            self.cfg.steps,
            self.progress,
            restarted=self.restarted,
            stores=self.stores,
        )
        parts = sup.run(text_ref, self.resume)
        self._gen.seconds["detail (slowest rank)"] = max(p.seconds for p in parts)
        return parts

    def _assemble(self, parts: list[RankResult]) -> torch.Tensor:
        """The whole latents (B, C, f, h, w) from every rank's tokens."""
        from .detail import from_tokens

        g = self.plan.window_group  # a group's tokens: its members' slices, in order
        groups = [torch.cat([parts[j * g + s].tokens for s in range(g)], dim=1) for j in range(len(parts) // g)]
        tokens = self.sharding.unshard(groups)  # (B, N, C, pt, ph, pw) raster order
        return from_tokens(tokens, self.sharding.spec.grid)

    def _remove_stores(self) -> None:
        from .local import remove_store

        for store in self.stores:
            remove_store(store)

    def _say_proxy_times(self, seconds: dict) -> None:
        """The proxy worker's model loading and prompt encoding, one line each (as a one-process run says them)."""
        if "load" in seconds:
            self._gen.say(f"loading model {self.cfg.model} (proxy worker) ... {seconds['load']:.1f} s")
        if "text" in seconds:
            self._gen.say(f"encoding prompt (proxy worker) ... {seconds['text']:.1f} s")
