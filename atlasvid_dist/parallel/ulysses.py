"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards, full attention, and back.

Each rank holds q, k, v for its L_local tokens and all H heads, (B, H, L_local, D). One all-to-all (q, k, v
together) gives every rank H/P heads over the whole sequence (rank order); it runs SDPA on those and a second
all-to-all returns (B, H, L_local, D). The all-to-alls are a differentiable autograd Function whose backward is
the inverse all-to-all, so gradients flow back through the same routes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import InputError, PlanError
from .comm import CommStats, all_to_all, group_rank, group_size


def _all_to_all(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, group, stats, category: str, step: str, timeout
) -> torch.Tensor:
    """Split ``scatter_dim`` into P chunks (chunk j to rank j) and concatenate what arrives along ``gather_dim``."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.unflatten(scatter_dim, (n, x.shape[scatter_dim] // n)).movedim(scatter_dim, 0).contiguous()  # (P, ...)
    out = all_to_all(torch.empty_like(x), x, group, stats=stats, category=category, step=step, timeout=timeout)
    return out.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)  # chunk from rank j at block j


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, stats, category, step, timeout):
        ctx.args = (scatter_dim, gather_dim, group, stats, category, step, timeout)
        return _all_to_all(x, scatter_dim, gather_dim, group, stats, f"{category}.fwd", step, timeout)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group, stats, category, step, timeout = ctx.args
        g = _all_to_all(grad, gather_dim, scatter_dim, group, stats, f"{category}.bwd", step, timeout)
        return g, None, None, None, None, None, None, None


def seq_to_heads(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats | None = None,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """(..., H, L_local, D) sequence shards -> (..., H/P, L, D) head shards, differentiable."""
    return _AllToAll.apply(x, x.dim() - 3, x.dim() - 2, group, stats, "ulysses", step, timeout)


def heads_to_seq(
    x: torch.Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats | None = None,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """(..., H/P, L, D) head shards -> (..., H, L_local, D) sequence shards, differentiable."""
    return _AllToAll.apply(x, x.dim() - 2, x.dim() - 3, group, stats, "ulysses", step, timeout)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    stats: CommStats | None = None,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    scale: float | None = None,
    step: str = "",
    timeout: float | None = None,
) -> torch.Tensor:
    """Dense attention of the local queries over the whole (rank-ordered) sequence, by head-parallel all-to-all.

    q, k, v: (B, H, L_local, D) with the same L_local on every rank (unequal shards are not supported: the
    all-to-all uses equal splits) and H divisible by the group size (PlanError otherwise, before any
    communication). extra_k, extra_v: (B, H, C, D) keys every rank holds in full, attended as well; their
    gradient on a rank is that rank's part (sum over the group for the full one). Returns (B, H, L_local, D).
    Bytes are counted under ``ulysses.fwd`` / ``ulysses.bwd``.
    """
    n = group_size(group)
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise InputError(
            f"ulysses_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all "
            f"be (B, H, L_local, D) of one shape"
        )
    if q.shape[1] % n:
        raise PlanError(
            f"ulysses_attention: {q.shape[1]} heads do not split over a group of {n} ranks "
            f"(heads must be divisible by the group size)"
        )
    if (extra_k is None) != (extra_v is None):
        raise InputError("ulysses_attention: give both extra_k and extra_v, or neither")
    if extra_k is not None and (
        extra_k.shape != extra_v.shape
        or extra_k.dim() != 4
        or extra_k.shape[:2] != q.shape[:2]
        or extra_k.shape[-1] != q.shape[-1]
    ):
        raise InputError(f"ulysses_attention: extra_k {tuple(extra_k.shape)} must be (B, H, C, D) with q's B, H, D")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    qkv = seq_to_heads(torch.stack([q, k, v]), group, stats, step, timeout)  # (3, B, H/P, L, D)
    qh, kh, vh = qkv.unbind(0)
    if extra_k is not None:
        hp, r = q.shape[1] // n, group_rank(group)
        heads = slice(r * hp, (r + 1) * hp)
        kh = torch.cat([kh, extra_k[:, heads]], dim=2)  # (B, H/P, L + C, D)
        vh = torch.cat([vh, extra_v[:, heads]], dim=2)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # (B, H/P, L, D)
    return heads_to_seq(out, group, stats, step, timeout)
