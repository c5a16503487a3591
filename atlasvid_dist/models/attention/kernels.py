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


def gathered_windows_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    out: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    max_windows: int = 0,
) -> torch.Tensor:
    """Attention inside windows whose rows are gathered from row tables one chunk of windows at a time.

    q (B, Nq, H, D) query rows; k, v (B, Nk, H, D) key/value rows (a window's own rows, then any rows windows read
    besides them, e.g. the proxy's); query_index (W, Lq) and key_index (W, Lk) long: the row behind every query
    and key slot of every window. Without padding every slot is real and window w's outputs go to rows
    ``query_index[w]`` of ``out`` (B, N_out, H, D). With padding, a padding slot may name any row: padded keys are
    masked by key_valid (W, Lk) bool, and out_index (W, Lq) names the output row of every query slot, -1 at
    padding (dropped). Only one chunk's gathered rows exist at a time (``max_windows`` > 0 windows per SDPA call;
    0 picks it from AUTO_CHUNK_ELEMENTS): one gather each of q, k and v straight from the rows, one SDPA call, one
    row copy of its output into ``out``; no window-major copy of a whole layer is made. Writes ``out``, returns it.
    """
    b, h, d = q.shape[0], q.shape[2], q.shape[3]
    nw, lq = query_index.shape
    lk = key_index.shape[1]
    step = max_windows or auto_window_batch(b, nw, lk, h, d)
    padded = out_index is not None and bool((out_index < 0).any())  # one device sync per call, not per chunk
    dst_index = query_index if out_index is None else out_index
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        n = w1 - w0
        qc = take_rows(q, query_index[w0:w1].reshape(-1)).view(b * n, lq, h, d)  # (B*n, Lq, H, D)
        kc = take_rows(k, key_index[w0:w1].reshape(-1)).view(b * n, lk, h, d)  # (B*n, Lk, H, D)
        vc = take_rows(v, key_index[w0:w1].reshape(-1)).view(b * n, lk, h, d)
        mask = None
        if key_valid is not None:
            mask = key_valid[w0:w1].repeat(b, 1)[:, None, None, :]  # (B*n, 1, 1, Lk)
        o = sdpa(qc, kc, vc, mask).reshape(b, n * lq, h, d)  # (B, n*Lq, H, D) window-major rows
        dst = dst_index[w0:w1].reshape(-1)
        if padded:
            keep = dst >= 0
            o, dst = o[:, keep], dst[keep]
        put_rows(out, dst, o.to(out.dtype))
    return out


def _flat_rows(index: torch.Tensor, batch: int, rows: int) -> torch.Tensor:
    """(M,) row ids of every batch entry of a (B, rows, ...) tensor seen as (B * rows, ...): (B * M,)."""
    if batch == 1:
        return index
    return (index[None] + rows * torch.arange(batch, device=index.device)[:, None]).reshape(-1)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) -> x[:, index] (B, M, ...), gathered along the first axis of x seen as (B * N, row) (CPU's
    index_select along dim 1 is several times slower than along dim 0 of the same bytes)."""
    b, n = x.shape[:2]
    flat = x.reshape(b * n, -1).index_select(0, _flat_rows(index, b, n))  # (B * M, row)
    return flat.view(b, index.numel(), *x.shape[2:])


def put_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """out[:, index] = src for a contiguous out (B, N, ...) and src (B, M, ...), in place, as one row copy."""
    b, n = out.shape[:2]
    out.view(b * n, -1).index_copy_(0, _flat_rows(index, b, n), src.reshape(b * index.numel(), -1))
