"""The Ray actors of a distributed generation: one proxy worker (text + stage 1), N detail workers (stage 2 ranks).

Plain classes; the driver (``cluster.start_actors``) wraps them with ``ray.remote`` and its placement group, so they can
also be used in-process. Every worker builds its own TwoStageGenerator from the same GenerateConfig for
loading, text encoding and (proxy worker) stage 1; the ranks run ``pipeline/stages.py``'s stages on their share.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from .results import ProxyResult, RankResult, SharedText


def rank_logger(role: str) -> logging.LoggerAdapter:
    """A logger whose lines carry the worker's role ('rank 3', 'proxy'); Ray forwards them to the driver."""
    base = logging.getLogger(f"atlasvid_dist.runtime.{role.replace(' ', '')}")
    if not base.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s atlasvid %(role)s: %(message)s", "%H:%M:%S"))
        base.addHandler(handler)
        base.setLevel(logging.INFO)
        base.propagate = False
    return logging.LoggerAdapter(base, {"role": role})


def pin_threads() -> int:
    """Give torch as many CPU threads as Ray granted this worker (at least 1) and return that number.

    Explicit rather than left to OMP_NUM_THREADS: the same worker then computes the same bytes wherever it runs
    (a CPU convolution's result depends on its thread count) and shared cores are not oversubscribed.
    """
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


def _generator(cfg):
    """The worker's TwoStageGenerator; its CUDA check is :func:`device_problem`'s (reported, not raised here)."""
    from ..pipeline.generate import TwoStageGenerator

    return TwoStageGenerator(cfg, progress=False, local_device=False)


def device_problem(cfg, role: str) -> str | None:
    """Why this worker cannot run on ``cfg.device`` (None: it can): a CUDA run needs a CUDA device in every
    worker. The message names the worker's role, its node and what it sees."""
    if cfg.device != "cuda" or torch.cuda.is_available():
        return None
    import ray

    node = ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
    return (
        f"{role} on node {node}: --gpus runs on CUDA, but this worker's torch finds no usable CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, "
        f"built for CUDA {torch.version.cuda}); check the node's driver and that Ray gave the worker a GPU"
    )


def _maybe_crash(step: int, fault_step: int | None, marker: str | None, who: str) -> None:
    """Fault injection (ATLASVID_FAULT_INJECT): exit abruptly, as a crash would (no cleanup, no reply), the first
    time ``step`` reaches ``fault_step``; the marker file makes the restarted worker go on."""
    if step == fault_step and marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"{who} step {step}\n")
        os._exit(1)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


def _reconstructed() -> bool:
    """True inside an actor that Ray restarted after its process died (False outside Ray)."""
    import warnings

    try:
        import ray

        with warnings.catch_warnings():  # Ray's own method calls its deprecated actor_id property
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not in an actor
        return False


class ProxyWorker:
    """Text encoding and stage 1 (the proxy) on one device.

    With ``ckpt_dir`` every stage-1 step is committed there (latents, scheduler, RNG; marker last), and a worker
    that Ray restarts after a crash resumes stage 1 from the newest committed step instead of from noise.
    ``fault_step`` (test hook, ATLASVID_FAULT_INJECT=proxy:STEP) makes the process exit abruptly after committing
    that stage-1 step, the first time only.
    """

    def __init__(self, cfg, ckpt_dir: str | None = None, fault_step: int | None = None):
        pin_threads()
        self.gen = _generator(cfg)
        self.problem = device_problem(cfg, "proxy worker")
        self.ckpt = None
        if ckpt_dir is not None:
            from ..pipeline.run_folder import run_checkpointer

            self.ckpt = run_checkpointer(ckpt_dir, "proxy")  # tied to the run folder's run id and config checksum
        self.fault_step = fault_step
        self.fault_marker = None if ckpt_dir is None else os.path.join(ckpt_dir, "fault-injected-proxy")
        self.steps_done = 0
        self.log = rank_logger("proxy")

    def run(self, stage1: bool = True) -> ProxyResult:
        """Text encoding, then stage 1 unless ``stage1`` is False (--proxy-parallel: the detail ranks run it).

        A ProxyResult of CPU tensors (uncond / proxy may be None), with the stage-1 step this worker resumed from
        and whether Ray restarted it after a crash."""
        gen = self.gen
        t0 = time.perf_counter()
        comp = gen.load()
        text = gen.encode(comp)
        saved = gen.resume_state(self.ckpt) if self.ckpt is not None else None
        if saved is not None:
            self.log.info("restarted: resuming stage 1 from its committed step %d", saved.step)
        gen.on_commit = self._committed
        proxy = gen.stage1(comp, text, self.ckpt, saved) if gen.cfg.uses_proxy and stage1 else None
        gen.seconds["proxy actor"] = time.perf_counter() - t0
        self.log.info("text%s done in %.1f s", " + stage 1" if proxy is not None else "", gen.seconds["proxy actor"])
        shared = SharedText(_cpu(text.cond), _cpu(text.uncond), _cpu(proxy))
        return ProxyResult(
            shared,
            gen.seconds,
            list(gen.step_times.get("proxy", [])),
            None if saved is None else saved.step,
            _reconstructed(),
        )

    def device_check(self) -> str | None:
        """Why this worker cannot run (``device_problem``); None when it can."""
        return self.problem

    def _committed(self, stage: str, step: int) -> None:
        self.steps_done = step
        _maybe_crash(step, self.fault_step, self.fault_marker, f"proxy {stage}")

    def progress(self) -> int:
        """Stage-1 steps committed so far."""
        return self.steps_done


class DetailWorker:
    """One rank of stage 2: joins the detail group, denoises its own windows, returns its tokens."""

    def __init__(
        self,
        cfg,
        rank: int,
        world: int,
        ckpt_dir: str | None = None,
        fault_step: int | None = None,
        plan=None,
    ):
        """``plan``: the run's ParallelPlan (proxy parallelism, window groups, ownership order); None: one rank per
        window group, stage 1 on one rank, time slabs."""
        from ..config.parallel import ParallelPlan

        self.cfg, self.rank, self.world = cfg, rank, world
        self.plan = plan if plan is not None else ParallelPlan(workers=world, window_order="thw", shift_exchange="kv")
        self.log = rank_logger(f"rank {rank}")
        pin_threads()
        self.gen = _generator(cfg)
        self.problem = device_problem(cfg, f"detail rank {rank}")
        self.steps_done = 0
        self.ckpt = None
        if ckpt_dir is not None:
            from ..pipeline.run_folder import run_checkpointer

            self.ckpt = run_checkpointer(ckpt_dir, f"rank-{rank}", keep=world + 2)
        self.fault_step = fault_step
        self.fault_marker = None if ckpt_dir is None else os.path.join(ckpt_dir, f"fault-injected-rank-{rank}")

    def device_check(self) -> str | None:
        """Why this worker cannot run (``device_problem``); None when it can."""
        return self.problem

    def committed_steps(self) -> list[int]:
        """Stage-2 steps this rank has committed and that are intact (empty without checkpoints); a damaged step
        is logged with the reason and left out, so the run resumes from an older step every rank still has."""

        def skipped(step, reason):
            self.log.warning("skipping committed step %d: %s", step, reason)

        return [] if self.ckpt is None else self.ckpt.intact_steps(on_skip=skipped)

    def address(self, local: bool = False) -> tuple[str, str]:
        """(host, init_method) of the group's rendezvous (asked of rank 0): loopback and a file store when every
        rank is on this machine (``local``), else this node's address and a TCP store (``local.rendezvous``)."""
        import ray

        from .local import rendezvous

        return rendezvous(ray.util.get_node_ip_address(), local)

    def run(
        self, master: tuple[str, str], text: SharedText, timeout_s: float, resume_step: int | None = None
    ) -> RankResult:
        """Stage 2 on this rank (stage 1 too with --proxy-parallel): its tokens and what it sent, as a RankResult."""
        from ..parallel import comm
        from ..pipeline.text import TextEmbeddings

        self._join(master, timeout_s, resume_step)
        try:
            t0 = time.perf_counter()
            comp = self.gen.load()
            dev, dt = self.gen.device, self.gen.dtype
            emb = TextEmbeddings(text.cond.to(dev, dt), None if text.uncond is None else text.uncond.to(dev, dt))
            proxy = None if text.proxy is None else text.proxy.to(dev, dt)
            proxy_stats = comm.CommStats()
            if proxy is None and self.cfg.uses_proxy:  # --proxy-parallel: stage 1 over this group
                from .proxy import denoise_proxy_rank

                proxy = denoise_proxy_rank(
                    self.gen, comp, emb, self.rank, self.world, self.plan.proxy_parallel, None, proxy_stats, timeout_s
                )
            stats = comm.CommStats()
            tokens, per_layer, forwards = self._stage2(comp, emb, proxy, stats, timeout_s, resume_step)
            self.log.info(
                "stage 2 done: %d tokens, %.1f s, %.3f MB sent",
                tokens.shape[1],
                time.perf_counter() - t0,
                stats.total() / 1e6,
            )
            mine = proxy.cpu() if self.rank == 0 and text.proxy is None and proxy is not None else None
            result = self._result(tokens, per_layer, stats, proxy_stats, time.perf_counter() - t0, mine)
            return dataclasses.replace(result, detail_forwards=forwards)
        finally:
            comm.teardown()

    def _join(self, master: tuple[str, str], timeout_s: float, resume_step: int | None) -> None:
        """Join the detail group at ``master`` (gloo on CPU, NCCL on CUDA)."""
        from ..parallel import comm
        from .local import is_loopback

        host, init_method = master
        if is_loopback(host):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs listen on 127.0.0.1, not the LAN address
        backend = "nccl" if self.cfg.device == "cuda" else "gloo"
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray gives each actor its own GPU (CUDA_VISIBLE_DEVICES)
            device_id = torch.device("cuda", 0)
        comm.init_group(backend, self.rank, self.world, init_method, timeout_s=timeout_s, device_id=device_id)
        self.log.info(
            "joined the %s group of %d ranks%s",
            backend,
            self.world,
            f"; resuming from committed step {resume_step}" if resume_step else "",
        )

    def _stage2(self, comp, emb, proxy, stats, timeout_s: float, resume_step: int | None):
        """``detail.denoise_rank`` on this rank's windows: (own tokens, bytes sent per layer, forwards)."""
        from .detail import denoise_rank

        self.steps_run, self.step_times, self._t_last = 0, [], time.perf_counter()
        groups = None
        if self.plan.window_group > 1:
            from ..parallel.window_group import new_groups

            groups = new_groups(self.world, self.plan.window_group)
        return denoise_rank(
            self.gen,
            comp,
            emb,
            proxy,
            self.rank,
            self.world,
            None,
            stats,
            timeout_s,
            on_step=self._step,
            ckpt=self.ckpt,
            resume_step=resume_step,
            window_group=self.plan.window_group,
            groups=groups,
            window_parallel=self.plan.window_parallel,
            window_order=self.plan.window_order,
            shift_exchange=self.plan.shift_exchange,
        )

    def _result(self, tokens, per_layer, stats, proxy_stats, seconds: float, proxy) -> RankResult:
        from ..pipeline.report import peak_memory

        median = sorted(self.step_times)[len(self.step_times) // 2] if self.step_times else 0.0
        return RankResult(
            rank=self.rank,
            tokens=tokens,
            sent=stats.total(),
            per_layer=per_layer,
            sent_per_step=stats.total() // max(1, self.steps_run),
            proxy_sent=proxy_stats.total(),
            seconds=seconds,
            step_seconds=median,
            peak_memory=peak_memory(self.cfg.device),
            proxy=proxy,
        )

    def peak_memory(self) -> dict:
        """This process's peaks so far (``report.peak_memory``): asked after the decode, which a rank runs after
        its detail-stage result (whose ``peak_memory`` is the peak up to then)."""
        from ..pipeline.report import peak_memory

        return peak_memory(self.cfg.device)

    def vae_scale(self) -> tuple[int, int]:
        """(temporal, spatial) pixels per latent unit of this worker's VAE (the driver's blender needs them)."""
        from ..pipeline.decode import vae_scale

        s = vae_scale(self.gen.load().vae)
        return s.temporal, s.spatial

    def decode(self, latents: torch.Tensor, tile_ids: list[int], tiling: dict):
        """Ray streaming generator: this rank's decode tiles of ``latents`` (model space, (1, C, f, h, w)), all
        advancing together; yields (tile index, first video frame, pixels float32 (n, th, tw, 3))."""
        from ..pipeline.decode import DecodeTiling, decode_tiles, plan_tiles

        t0 = time.perf_counter()
        from ..models.loading import on_device

        gen = self.gen
        cut = DecodeTiling(**tiling)
        tiles = plan_tiles(tuple(latents.shape[3:]), cut)
        lat = latents.to(gen.device, gen.dtype)
        with torch.no_grad(), on_device(gen.load().vae, gen.device, gen.cfg.offload_encoders) as vae:
            yield from decode_tiles(vae, lat, [tiles[i] for i in tile_ids], cut)
        self.log.info("decoded %d tile(s) in %.1f s", len(tile_ids), time.perf_counter() - t0)

    def _step(self, done: int) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._t_last)
        self._t_last = now
        self.steps_done = done
        self.steps_run = getattr(self, "steps_run", 0) + 1
        _maybe_crash(done, self.fault_step, self.fault_marker, f"rank {self.rank}")

    def progress(self) -> int:
        return self.steps_done
