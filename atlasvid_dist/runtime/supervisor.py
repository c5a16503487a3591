"""The stage-2 supervisor: launches every detail rank, restarts the run after a lost worker, shows each rank's
progress, collects the ranks' results, and fails naming the ranks that did not finish.

    sup = Stage2Supervisor(ray, calls, ranks, max_restarts=2, steps=30)
    results = sup.run(text_ref, resume=False)   # [RankResult] by rank; sup.restarted: ranks whose worker died

When a rank's process dies, Ray restarts it and every rank resumes from the newest step all ranks committed (the
surviving processes stay; they only rejoin a new group, at a new rendezvous).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import RunFailure
from .cluster import RayCalls, one_node
from .progress import RankBars
from .results import RankResult


@dataclass
class Stage2Supervisor:
    """Runs stage 2 over ``ranks`` (detail actors) until every rank returns, or fails (RunFailure)."""

    ray: object
    """The ``ray`` module."""
    calls: RayCalls
    """Calls into the actors, with the run's timeout."""
    ranks: list
    """Detail actors, by rank."""
    max_restarts: int = 2
    """Restarts allowed per rank (all ranks together: ``max_restarts * ranks``)."""
    steps: int = 0
    """Stage-2 steps (the progress bars' length)."""
    progress: bool = True
    """Draw one bar per rank (else only count, for the timeout messages)."""
    restarted: list[int] = field(default_factory=list)
    """Ranks whose worker died and was restarted (once per restart)."""
    stores: list[str] = field(default_factory=list)
    """Rendezvous init methods used (the caller removes their file stores after the run)."""
    bar: RankBars | None = None
    """The ranks' bars while :meth:`run` runs."""

    @property
    def timeout_s(self) -> float:
        return self.calls.timeout_s

    def run(self, text_ref, resume: bool = False) -> list[RankResult]:
        """Stage 2 on every rank; ``resume`` continues from the newest step every rank committed."""
        self.bar = RankBars(self.steps, len(self.ranks), "detail stage", enabled=self.progress)
        try:
            return self._supervise(text_ref, self.common_step() if resume else None)
        finally:
            self.bar.close()

    def _supervise(self, text_ref, resume: int | None) -> list[RankResult]:
        ray = self.ray
        while True:
            results, errors = self._collect(self._launch(text_ref, resume))
            if not errors:
                self.bar.finish()
                return results
            dead = [r for r, e in errors if isinstance(e, ray.exceptions.RayActorError)]
            if not dead or len(self.restarted) + len(dead) > self.max_restarts * len(self.ranks):
                r, e = next(((d, e) for d, e in errors if d in dead), errors[0])
                raise RunFailure(f"detail rank {r} failed: {e}")
            self.restarted.extend(dead)
            resume = self.common_step()

    def _launch(self, text_ref, resume: int | None) -> list:
        """A new rendezvous on rank 0, then every rank's stage-2 task."""
        master = self.calls.call(self.ranks[0].address, "detail rank 0 (rendezvous)", one_node(self.ray))
        self.stores.append(master[1])  # a file store's folder is removed after the run
        return [a.run.remote(master, text_ref, self.timeout_s, resume) for a in self.ranks]

    def common_step(self) -> int | None:
        """The newest stage-2 step every rank has committed (None: start stage 2 from the beginning)."""
        steps = [
            set(self.calls.call(a.committed_steps, f"detail rank {i} (checkpoints)")) for i, a in enumerate(self.ranks)
        ]
        common = set.intersection(*steps)
        return max(common) if common else None

    def _collect(self, refs) -> tuple[list, list]:
        """Wait for every rank's task; (results by rank, [(rank, error)]). Ranks that outlive a dead peer fail in
        their next exchange (the group breaks), so every task ends. Meanwhile one bar per rank shows its steps."""
        ray = self.ray
        results, errors = [None] * len(refs), []
        pending = dict(enumerate(refs))
        deadline = time.monotonic() + self.timeout_s * 2
        while pending:
            if time.monotonic() > deadline:
                steps = "" if self.bar is None else f" (steps done by rank: {self.bar.done})"
                raise RunFailure(
                    f"detail ranks {sorted(pending)} did not finish within {self.timeout_s * 2:g} s{steps}"
                )
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0.5)
            for i in [i for i, ref in pending.items() if ref in ready]:
                try:
                    results[i] = ray.get(pending.pop(i))
                except ray.exceptions.RayError as exc:
                    errors.append((i, exc))
            if pending:
                self._show_progress()
        return results, errors

    def _show_progress(self) -> None:
        """Best effort: a rank that is busy restarting is skipped."""
        ray = self.ray
        refs = [a.progress.remote() for a in self.ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        done = []
        for ref in refs:
            try:
                done.append(ray.get(ref) if ref in ready else None)
            except ray.exceptions.RayError:
                done.append(None)
        if self.bar is not None:
            self.bar.update(done)
