"""Attention kernels on (B, L, H, D) tensors: the dense reference, SDPA, and windows stacked in the batch dimension.

All take and return the token-major layout the transformer uses, (batch, tokens, heads, head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Slow, obvious attention: softmax(q k^T / sqrt(d) masked) v. mask (Lq, Lk) bool, True = may attend."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)  # (B, Lq, H, D)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA on (B, L, H, D); mask broadcastable to (B, H, Lq, Lk), bool, True = may attend."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # (B, H, Lq, D)
    return out.transpose(1, 2)


#: transient key/value elements one SDPA call may gather when ``max_windows`` is 0 (auto)
AUTO_CHUNK_ELEMENTS = 1 << 28


def auto_window_batch(batch: int, windows: int, key_len: int, heads: int, head_dim: int) -> int:
    """Windows per SDPA call so that one call's keys stay under AUTO_CHUNK_ELEMENTS."""
    per_window = batch * key_len * heads * head_dim
    return max(1, min(windows, AUTO_CHUNK_ELEMENTS // max(per_window, 1)))


def windows_sdpa(
    qw: torch.Tensor,
    kw: torch.Tensor,
    vw: torch.Tensor,
    key_valid: torch.Tensor | None,
    max_windows: int = 0,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention inside windows stacked in the batch dimension.

    qw (B, W, Lq, H, D); kw, vw (B, W, Lk, H, D); key_valid (W, Lk) bool or None (padding slots are False).
    extra_k, extra_v (B, W, C, H, D), possibly an expanded view: keys every window reads besides its own (the
    proxy), concatenated one chunk of windows at a time so they are never materialised for all windows at once.
    ``max_windows`` > 0 sets the windows per SDPA call; 0 picks it from AUTO_CHUNK_ELEMENTS.
    Returns (B, W, Lq, H, D).
    """
    b, nw, lq, h, d = qw.shape
    c = 0 if extra_k is None else extra_k.shape[2]
    step = max_windows or auto_window_batch(b, nw, kw.shape[2] + c, h, d)
    parts = []
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        k, v = kw[:, w0:w1], vw[:, w0:w1]
        if extra_k is not None:
            k = torch.cat([k, extra_k[:, w0:w1]], dim=2)  # (B, w, Lk + C, H, D)
            v = torch.cat([v, extra_v[:, w0:w1]], dim=2)
        mask = None
        if key_valid is not None:
            valid = key_valid[w0:w1]
            if c:
                valid = torch.cat([valid, valid.new_ones(w1 - w0, c)], dim=1)  # (w, Lk + C)
            mask = valid.repeat(b, 1)[:, None, None, :]  # (B*w, 1, 1, Lk + C)
        o = sdpa(qw[:, w0:w1].flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask)  # (B*w, Lq, H, D)
        parts.append(o.unflatten(0, (b, w1 - w0)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
