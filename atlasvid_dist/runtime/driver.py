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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.generate import GenerateConfig
from ..errors import ConfigError, PlanError, RunFailure, check

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

    def to_dict(self) -> dict:
        """The run's machine-readable summary (``RunResult.to_dict``) with the distribution's numbers by rank."""
        return {**self.result.to_dict(), "workers": self.workers, "bytes_sent": list(self.bytes_sent),
                "bytes_sent_per_step": list(self.bytes_per_step), "proxy_bytes_sent": list(self.proxy_bytes),
                "tokens": list(self.tokens), "decode_tiles": list(self.tiles),
                "median_step_seconds_by_rank": list(self.step_seconds), "restarted": list(self.restarted)}

    def summary(self) -> str:
        per_step = self.bytes_per_step or [0] * len(self.bytes_sent)
        sent = ", ".join(f"rank {r}: {b / 1e6:.3f} MB, {s / 1e6:.3f} MB/step"
                         for r, (b, s) in enumerate(zip(self.bytes_sent, per_step)))
        restarts = "".join(f"; worker of rank {r} was restarted" for r in self.restarted)
        if self.proxy_resumed is not None:
            restarts += f"; proxy worker was restarted and resumed stage 1 from step {self.proxy_resumed}"
        proxy = ""
        if any(self.proxy_bytes):
            proxy = "; stage 1 on all ranks, bytes sent " + ", ".join(f"rank {r}: {b / 1e6:.3f} MB"
                                                                       for r, b in enumerate(self.proxy_bytes))
        tiles = f"; decode tiles per rank {self.tiles}" if self.tiles else ""
        if self.step_seconds:
            tiles += "; s/step per rank [" + ", ".join(f"{x:.3f}" for x in self.step_seconds) + "]"
        return (f"{self.result.summary()}\n{self.workers} detail workers; tokens per rank {self.tokens}; "
                f"bytes sent per rank ({sent}){proxy}{tiles}{restarts}")


class DistributedGenerator:
    """Runs one GenerateConfig over ``workers`` detail actors (see the module docstring)."""

    def __init__(self, cfg: GenerateConfig, workers: int, ray_address: str | None = None, progress: bool = True,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_restarts: int = 2, plan=None):
        from ..config.parallel import ParallelPlan

        check(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1, "workers", workers,
              "must be an integer >= 1")
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
        self.stores: list[str] = []
        """Rendezvous init methods of this run (file stores are removed at its end)."""
        self.bar = None

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
        g = self.plan.window_group
        self.sharding = shard_for(self.cfg.method, self.cfg.detail_grid, self.workers // g)  # over window groups
        if g > 1:
            from ..parallel.window_group import group_layout

            check(self.plan.window_parallel == "ulysses", "window_parallel", self.plan.window_parallel,
                  "only 'ulysses' splits a window over a group (ring inside windows is not implemented)")
            self.layouts = [group_layout(self.sharding, r, g) for r in range(self.workers)]  # PlanError if too few
        self.fault = fault_injection(self.workers)

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

        started = self._start_ray(ray)
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

        self._fit_check()
        check_outputs(self.cfg)
        # the folder's manifest (run id, config checksum, worker count), checked or written
        self._gen._checkpointer(resume, workers=self.workers, overwrite=overwrite)
        self.resume = resume
        if self.plan.proxy_parallel != "none" and self.cfg.uses_proxy:
            from .proxy import check_proxy_split

            check_proxy_split(self.cfg.proxy.grid.size, self._gen.model_spec().num_heads, self.workers,
                              self.plan.proxy_parallel)

    def _check_cluster(self, ray) -> None:
        """A joined cluster must hold the run's GPUs (PlanError naming what it needs and has; asked of Ray, not of
        this process, which may have none); the GPUs' name (Ray's ``accelerator_type:`` resource) picks the
        'auto' device profile."""
        if self.cfg.device != "cuda":
            return
        self._check_capacity(ray, {"GPU": 1.0})
        kinds = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
        self._gen.gpu_name = " ".join(kinds)

    def _result(self, latents, parts, out_bytes) -> DistributedResult:
        """The DistributedResult of a finished run from the ranks' reports."""
        from ..pipeline.generate import RunResult
        from ..pipeline.report import median

        gen = self._gen
        steps = {"proxy": median(gen.step_times.get("proxy", [])),
                 "detail": median(p["step_seconds"] for p in parts)}
        result = RunResult.for_config(self.cfg, gen.seconds, out_bytes,
                                      step_seconds={k: v for k, v in steps.items() if v is not None},
                                      peak_memory=[{"rank": p["rank"], **p["peak_memory"]} for p in parts])
        return DistributedResult(result, self.workers, [p["sent"] for p in parts], [p["per_layer"] for p in parts],
                                 [p["tokens"].shape[1] for p in parts], list(self.restarted),
                                 [p["sent_per_step"] for p in parts], self.proxy_resumed,
                                 [p["proxy_sent"] for p in parts], self.tiles, [p["step_seconds"] for p in parts])

    def _embedded(self) -> bool:
        """True when this run starts (or found) Ray on this machine only (``local.embedded``)."""
        from .local import embedded

        return embedded(self.address)

    def _start_ray(self, ray) -> bool:
        """Join ``ray_address`` or start Ray embedded (on loopback, one retry: ``local.init_with_retry``); True when
        this call started it (and must stop it)."""
        from .local import LOOPBACK, init_with_retry, is_loopback

        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every rank's lines, not "[repeated 3x across cluster]"
        if not self._embedded():  # `ray job submit`: RAY_ADDRESS is the job's own cluster
            ray.init(address=self.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
            return True
        gpus = self.workers if self.cfg.device == "cuda" else 0
        init_with_retry(lambda: ray.init(address="local", num_cpus=self.workers, num_gpus=gpus,
                                         include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=True,
                                         configure_logging=False), cleanup=ray.shutdown)
        node_ip = ray.util.get_node_ip_address()
        if not is_loopback(node_ip):
            import logging

            logging.getLogger("atlasvid_dist.runtime").warning(
                "embedded Ray runs on %s, not 127.0.0.1 (ray was imported before the run could keep it on "
                "loopback); its ports listen there (docs/security.md)", node_ip)
        return True

    @staticmethod
    def _one_node(ray) -> bool:
        """True when the Ray cluster is this one machine (every rank can rendezvous on loopback)."""
        return len([n for n in ray.nodes() if n.get("Alive")]) == 1

    def _generate(self, ray):
        with rank_scratch(self.cfg.run_dir) as ckpt_dir:
            return self._generate_in(ray, ckpt_dir)

    def _generate_in(self, ray, ckpt_dir: str):
        """The run on the cluster; every rank's checkpoints go to ``ckpt_dir``."""
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .actors import DetailWorker, ProxyWorker

        cuda = self.cfg.device == "cuda"
        bundle = {"CPU": 1.0, **({"GPU": 1.0} if cuda else {})}
        self._check_capacity(ray, bundle)
        pg = placement_group([dict(bundle) for _ in range(self.workers)], strategy="PACK")
        if not self._wait(ray, pg.ready()):
            remove_placement_group(pg)
            raise PlanError(f"placement group of {self.workers} bundles {bundle} could not be reserved within "
                            f"{self.timeout_s:g} s (cluster resources: {ray.cluster_resources()})")
        fault = self.fault
        try:
            def on(i, share, restarts=0):
                return dict(num_cpus=share, num_gpus=share if cuda else 0, max_restarts=restarts,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))

            # a crashed proxy worker is restarted by Ray and its task retried: it resumes stage 1 from its checkpoint
            proxy_actor = ray.remote(ProxyWorker).options(**on(0, 0.5, 1), max_task_retries=1).remote(
                self.cfg, ckpt_dir, fault[1] if fault and fault[0] == "proxy" else None)
            # two threads: progress() answers while run() works
            ranks = [ray.remote(DetailWorker).options(**on(r, 0.5, self.max_restarts), max_concurrency=2).remote(
                self.cfg, r, self.workers, ckpt_dir, fault[1] if fault and fault[0] == r else None,
                self.plan.proxy_parallel, self.plan.window_group, self.plan.window_parallel)
                for r in range(self.workers)]
            self._check_devices(ray, [("proxy worker", proxy_actor)] +
                                [(f"detail rank {r}", a) for r, a in enumerate(ranks)])
            stage1 = self.plan.proxy_parallel == "none"
            shared = self._wait(ray, proxy_actor.run.remote(stage1),
                                "proxy worker (text + stage 1)" if stage1 else "proxy worker (text)")
            ray.kill(proxy_actor)
            if shared["restarted"]:
                self.proxy_resumed = shared["resumed_step"] or 0
            for k in ("load", "text", "proxy"):  # the proxy actor's own stage times
                if k in shared["seconds"]:
                    self._gen.seconds[k] = shared["seconds"][k]
            self._gen.step_times["proxy"] = shared["step_times"]
            self._say_proxy_times(shared["seconds"])
            text_ref = ray.put({k: shared[k] for k in ("cond", "uncond", "proxy")})  # once, in the object store
            from .progress import RankBars

            self.bar = RankBars(self.cfg.steps, self.workers, "detail stage", enabled=self.progress)
            try:
                parts = self._stage2(ray, ranks, text_ref)
            finally:
                self.bar.close()
            self._gen.seconds["detail (slowest rank)"] = max(p["seconds"] for p in parts)
            g = self.plan.window_group  # a group's tokens: its members' slices, in order
            groups = [torch.cat([parts[j * g + s]["tokens"] for s in range(g)], dim=1) for j in range(len(parts) // g)]
            tokens = self.sharding.unshard(groups)  # (B, N, C, pt, ph, pw) raster order
            from .detail import from_tokens

            latents = from_tokens(tokens, self.sharding.spec.grid)
            out_bytes = self._outputs(ray, ranks, latents, shared["proxy"] if shared["proxy"] is not None
                                      else parts[0].get("proxy"))
        finally:
            remove_placement_group(pg)
            from .local import remove_store

            for store in self.stores:
                remove_store(store)
        return latents, parts, out_bytes

    def _check_devices(self, ray, actors) -> None:
        """Every worker runs on the run's device: RunFailure (exit 1) naming each worker (and its node) that
        cannot, e.g. a --gpus worker whose torch finds no CUDA device."""
        problems = [self._call(ray, a.device_check, f"{role} (device check)") for role, a in actors]
        problems = [p for p in problems if p]
        if problems:
            raise RunFailure("; ".join(problems))

    def _say_proxy_times(self, seconds: dict) -> None:
        """The proxy worker's model loading and prompt encoding, one line each (as a one-process run says them)."""
        if "load" in seconds:
            self._gen.say(f"loading model {self.cfg.model} (proxy worker) ... {seconds['load']:.1f} s")
        if "text" in seconds:
            self._gen.say(f"encoding prompt (proxy worker) ... {seconds['text']:.1f} s")

    def _outputs(self, ray, ranks, latents, proxy) -> int:
        """Save the latents if asked, decode the video (and the proxy video) over the ranks; the video's bytes.
        The two videos are put in place together (neither stays when either fails)."""
        from ..pipeline.generate import _save_latents
        from ..pipeline.outputs import PendingOutputs

        cfg = self.cfg
        if cfg.save_latents:
            _save_latents(cfg.save_latents, latents, cfg, proxy)
        with PendingOutputs() as pending:
            out_bytes = self._decode(ray, ranks, latents, cfg.out, cfg.video.fps,
                                     (cfg.video.height, cfg.video.width), "decode", pending)
            if cfg.save_proxy and proxy is not None:
                self._decode(ray, ranks, proxy, cfg.save_proxy, cfg.video.fps / cfg.method.temporal_scale, None,
                             "decode proxy", pending)
        return out_bytes

    def _decode(self, ray, ranks, latents, path: str, fps: float, out_hw, label: str, pending=None) -> int:
        """Tiles over the ranks (Ray streaming generators), blended and written in frame order here (one writer)."""
        from dataclasses import asdict

        from ..pipeline.decode import TileBlender, VaeScale
        from ..pipeline.video_io import Mp4Writer
        from .decode import assign_tiles, ray_stream, stream_to_writer

        t0 = time.perf_counter()
        tiling = self._gen.decode_tiling()
        scale = VaeScale(*self._call(ray, ranks[0].vae_scale, "detail rank 0 (VAE scale)"))
        blender = TileBlender.for_latents(tuple(latents.shape[2:]), tiling, scale, out_hw=out_hw)
        per_rank = assign_tiles(blender.tiles, self.workers)
        owner = [0] * len(blender.tiles)
        for r, ids in enumerate(per_rank):
            for i in ids:
                owner[i] = r
        ref = ray.put(latents.cpu())  # once; every rank reads it from the object store
        streams = [ray_stream(ray, a.decode.options(num_returns="streaming",
                                                    _generator_backpressure_num_objects=2 * len(ids)).remote(
                       ref, ids, asdict(tiling)), r, self.timeout_s) if ids else iter(())
                   for r, (a, ids) in enumerate(zip(ranks, per_rank))]
        h, w = out_hw or blender.out_hw
        bar = self._gen._bar(blender.frames, f"{label} ({self.workers} workers)", "frame")
        with Mp4Writer(path, fps=fps, width=w, height=h, pending=pending, crf=self.cfg.crf) as writer:
            def write(frames):
                writer.write(frames)
                bar.update(len(frames))
            stream_to_writer(blender, owner, streams, write)
        bar.close()
        if label == "decode":
            self.tiles = [len(ids) for ids in per_rank]
        self._gen.seconds[label] = time.perf_counter() - t0
        return writer.written.stat().st_size

    def _check_capacity(self, ray, bundle: dict) -> None:
        """Refuse at once (PlanError) a placement group the cluster can never hold, instead of waiting for it."""
        total = ray.cluster_resources()
        for name, per in bundle.items():
            need, have = per * self.workers, total.get(name, 0.0)
            if have < need:
                raise PlanError(f"{self.workers} workers need {need:g} {name} in all; the Ray cluster has {have:g} "
                                f"({total}); use fewer workers or add nodes")

    def _stage2(self, ray, ranks, text_ref) -> list[dict]:
        """Run stage 2 on every rank; when a rank's process dies, Ray restarts it and every rank resumes from the
        newest step all ranks committed (the surviving processes stay, they only rejoin a new group)."""
        resume = self._common_step(ray, ranks) if self.resume else None
        while True:
            master = self._call(ray, ranks[0].address, "detail rank 0 (rendezvous)", self._one_node(ray))
            self.stores.append(master[1])  # a file store's folder is removed after the run
            refs = [a.run.remote(master, text_ref, self.timeout_s, resume) for a in ranks]
            results, errors = self._collect(ray, refs, ranks)
            if not errors:
                if self.bar is not None:
                    self.bar.finish()
                return results
            dead = [r for r, e in errors if isinstance(e, ray.exceptions.RayActorError)]
            if not dead or len(self.restarted) + len(dead) > self.max_restarts * self.workers:
                r, e = next(((d, e) for d, e in errors if d in dead), errors[0])
                raise RunFailure(f"detail rank {r} failed: {e}")
            self.restarted.extend(dead)
            resume = self._common_step(ray, ranks)

    def _common_step(self, ray, ranks) -> int | None:
        """The newest stage-2 step every rank has committed (None: start stage 2 from the beginning)."""
        steps = [set(self._call(ray, a.committed_steps, f"detail rank {i} (checkpoints)")) for i, a in enumerate(ranks)]
        common = set.intersection(*steps)
        return max(common) if common else None

    def _call(self, ray, method, what: str, *args):
        """Call an actor method, waiting while the actor restarts (it is unavailable meanwhile)."""
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

    def _collect(self, ray, refs, ranks=None):
        """Wait for every rank's task; (results by rank, [(rank, error)]). Ranks that outlive a dead peer fail in
        their next exchange (the group breaks), so every task ends. Meanwhile one bar per rank shows its steps."""
        results, errors = [None] * len(refs), []
        pending = dict(enumerate(refs))
        deadline = time.monotonic() + self.timeout_s * 2
        while pending:
            if time.monotonic() > deadline:
                steps = "" if self.bar is None else f" (steps done by rank: {self.bar.done})"
                raise RunFailure(f"detail ranks {sorted(pending)} did not finish within {self.timeout_s * 2:g} s"
                                 f"{steps}")
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0.5)
            for i in [i for i, ref in pending.items() if ref in ready]:
                try:
                    results[i] = ray.get(pending.pop(i))
                except ray.exceptions.RayError as exc:
                    errors.append((i, exc))
            if ranks is not None and pending:
                self._show_progress(ray, ranks)
        return results, errors

    def _show_progress(self, ray, ranks) -> None:
        """Best effort: a rank that is busy restarting is skipped."""
        refs = [a.progress.remote() for a in ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        done = []
        for ref in refs:
            try:
                done.append(ray.get(ref) if ref in ready else None)
            except ray.exceptions.RayError:
                done.append(None)
        if self.bar is not None:
            self.bar.update(done)

    def _wait(self, ray, ref, what: str = ""):
        ready, _ = ray.wait([ref], timeout=self.timeout_s)
        if not what:
            return bool(ready)
        if not ready:
            raise RunFailure(f"{what} did not finish within {self.timeout_s:g} s")
        return self._get(ray, ref, what)

    @staticmethod
    def _get(ray, ref, what: str):
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise RunFailure(f"{what} failed: {exc}") from exc


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
