"""What the Ray actors hand back to the driver: frozen dataclasses (Ray pickles them), not dicts.

* :class:`ProxyResult` — the proxy worker's text embeddings, the clean proxy and its stage times;
* :class:`SharedText` — the part of it every detail rank reads (put once in the object store);
* :class:`RankResult` — one detail rank's tokens and what it measured (bytes sent, seconds, memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SharedText:
    """Text embeddings and the clean proxy, on CPU, as every detail rank receives them."""

    cond: torch.Tensor
    """Prompt embeddings."""
    uncond: torch.Tensor | None
    """Negative-prompt embeddings (None without guidance)."""
    proxy: torch.Tensor | None
    """Clean proxy latents (None: no proxy, or --proxy-parallel, where the detail ranks run stage 1)."""


@dataclass(frozen=True)
class ProxyResult:
    """What the proxy worker returns: the shared text and proxy, and how its stages went."""

    text: SharedText
    """Embeddings and the clean proxy for the detail ranks."""
    seconds: dict[str, float] = field(default_factory=dict)
    """The worker's stage times ('load', 'text', 'proxy', 'proxy actor', ...)."""
    step_times: list[float] = field(default_factory=list)
    """Seconds of every stage-1 step."""
    resumed_step: int | None = None
    """The committed stage-1 step this worker resumed from (None: it started from noise)."""
    restarted: bool = False
    """True when Ray restarted this worker after a crash."""


@dataclass(frozen=True)
class RankResult:
    """What one detail rank returns after stage 2."""

    rank: int
    """The rank."""
    tokens: torch.Tensor
    """Own tokens (B, n, C, pt, ph, pw), local order, on CPU."""
    sent: int
    """Bytes this rank sent to other ranks in stage 2 (after a restart: since the resume)."""
    per_layer: dict[int, int]
    """Bytes sent by layer (unshifted layers send 0)."""
    sent_per_step: int
    """Bytes sent per denoising step (cond + uncond passes)."""
    proxy_sent: int
    """--proxy-parallel: bytes sent in stage 1 (sequence parallelism and the final all-gather)."""
    seconds: float
    """Wall seconds of this rank's stage 2 (stage 1 included with --proxy-parallel)."""
    step_seconds: float
    """Median seconds of one stage-2 step (0.0 when no step ran)."""
    peak_memory: dict = field(default_factory=dict)
    """``pipeline.report.peak_memory`` of this rank's process at the end of its detail stage (before the decode)."""
    proxy: torch.Tensor | None = None
    """Rank 0 with --proxy-parallel: the clean proxy it computed (for --save-proxy / --save-latents)."""
    detail_forwards: dict = field(default_factory=dict)
    """Stage 2's forwards, ``total`` and ``reused`` (the first-block cache decides over every rank alike)."""


def rank_peaks(part: RankResult, after_decode: dict) -> dict:
    """One rank's entry of a run's ``peak_memory``: its process's peaks over the whole run (the decode included)
    and, under ``detail_stage``, the peaks at the end of its detail stage (both the latter when the decode's are
    unknown)."""
    return {"rank": part.rank, **(after_decode or part.peak_memory), "detail_stage": dict(part.peak_memory)}
