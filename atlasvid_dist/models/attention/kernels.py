"""Attention kernels on (B, L, H, D) tensors: the dense reference, SDPA, and windows stacked in the batch dimension.

All take and return the token-major layout the transformer uses, (batch, tokens, heads, head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Slow, obvious attention: softmax(q k^T / sqrt(d) masked) v. mask (Lq, Lk) bool, True = may attend."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)  # (B, Lq, H, D)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA on (B, L, H, D); mask broadcastable to (B, H, Lq, Lk), bool, True = may attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)  # (B, H, Lq, D)
    return out.transpose(1, 2)


def windows_sdpa(qw: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, key_valid: torch.Tensor | None,
                 max_windows: int = 0) -> torch.Tensor:
    """Attention inside windows stacked in the batch dimension.

    qw (B, W, Lq, H, D); kw, vw (B, W, Lk, H, D); key_valid (W, Lk) bool or None. Returns (B, W, Lq, H, D).
    ``max_windows`` > 0 processes that many windows per SDPA call to bound transient memory.
    """
    b, nw, lq, h, d = qw.shape
    step = max_windows or nw
    out = qw.new_empty(qw.shape) if step < nw else None
    parts = []
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        mask = None
        if key_valid is not None:
            mask = key_valid[w0:w1].repeat(b, 1)[:, None, None, :]  # (B*W, 1, 1, Lk)
        q = qw[:, w0:w1].flatten(0, 1)  # (B*W, Lq, H, D)
        k = kw[:, w0:w1].flatten(0, 1)  # (B*W, Lk, H, D)
        v = vw[:, w0:w1].flatten(0, 1)
        o = sdpa(q, k, v, mask).unflatten(0, (b, w1 - w0))  # (B, W, Lq, H, D)
        if out is None:
            parts.append(o)
        else:
            out[:, w0:w1] = o
    return out if out is not None else parts[0]
