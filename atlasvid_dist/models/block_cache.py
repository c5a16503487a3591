"""First-block cache: skip most of a forward when the first block says the step changed little.

Between neighbouring denoising steps a diffusion transformer's blocks change their input by almost the same
residual. The first block is a cheap probe of how much: when its residual (output - input) differs from the one
of the last forward that ran every block by less than ``threshold`` (relative L1), the other blocks are skipped
and the residual they added then is added again. One cache serves one prompt (cond and uncond each keep their
own); the last fully run forward stays the reference, so skips cannot drift step by step.

A process that holds only some of the tokens (a rank of the window-sharded stage 2) decides on every token:
``all_sum`` adds the two sums of the decision over the ranks, so every rank skips the same forwards (a rank that
skipped alone would leave its peers waiting for its keys and values). Model code stays free of
torch.distributed: the runtime passes that function in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

TINY = 1e-12


def _local(sums: torch.Tensor) -> torch.Tensor:
    return sums


@dataclass
class FirstBlockCache:
    """The reference residuals of one prompt's forwards and the decision to reuse them."""

    threshold: float
    """Largest relative L1 change of the first block's residual at which the other blocks are skipped."""
    all_sum: Callable[[torch.Tensor], torch.Tensor] = field(default=_local, repr=False)
    """Sums a (2,) float64 tensor (on the tokens' device) over every process holding a share of the tokens
    (identity for one process)."""
    first: torch.Tensor | None = None
    """First block's residual (B, n, D) at the last forward that ran every block."""
    rest: torch.Tensor | None = None
    """Residual the other blocks added then (B, n, D)."""
    computed: int = 0
    """Forwards that ran every block."""
    reused: int = 0
    """Forwards that reused :attr:`rest`."""

    def change(self, first: torch.Tensor) -> float:
        """Relative L1 change of the first block's residual since the reference (inf without one)."""
        if self.first is None or self.first.shape != first.shape:
            return float("inf")
        # on the residual's device: an NCCL group reduces CUDA tensors only (runtime all_sum stages for gloo)
        sums = torch.stack([(first - self.first).abs().sum(), self.first.abs().sum()]).double()  # (2,)
        sums = self.all_sum(sums)
        return float(sums[0] / max(float(sums[1]), TINY))

    def reuse(self, first: torch.Tensor) -> bool:
        """True (and counted) when the forward with this first-block residual may skip the other blocks."""
        ok = self.change(first) < self.threshold
        self.reused += ok
        return ok

    def store(self, first: torch.Tensor, rest: torch.Tensor) -> None:
        """Make a fully run forward the reference."""
        self.first, self.rest = first.detach(), rest.detach()
        self.computed += 1

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) for a checkpoint, names under ``prefix``."""
        tensors = {} if self.first is None else {f"{prefix}.first": self.first.cpu(), f"{prefix}.rest": self.rest.cpu()}
        return tensors, {"computed": self.computed, "reused": self.reused}

    def restore(self, tensors: dict, meta: dict, prefix: str, device, dtype) -> None:
        """Continue from :meth:`state`'s output (no tensors: no reference yet)."""
        first = tensors.get(f"{prefix}.first")
        self.first = None if first is None else first.to(device, dtype)
        self.rest = None if first is None else tensors[f"{prefix}.rest"].to(device, dtype)
        self.computed, self.reused = int(meta["computed"]), int(meta["reused"])
