"""Attention kernels on (B, L, H, D) tensors: the dense reference, SDPA, and windows stacked in the batch dimension.

All take and return the token-major layout the transformer uses, (batch, tokens, heads, head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class WindowRows:
    """Windows with the same number of real queries and of real keys, as index tensors into row tables
    (:func:`gathered_windows_sdpa`); no padding slot: cut windows run at their own lengths."""

    query: torch.Tensor
    """(W, lq) row of each window's real queries (their outputs go back to the same rows)."""
    keys: torch.Tensor
    """(W, lk + C) rows of each window's real keys, then its C rows read besides them (e.g. proxy rows)."""


def group_windows(
    query: torch.Tensor,
    query_valid: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    extra: torch.Tensor | None = None,
) -> tuple[WindowRows, ...]:
    """Padded window layouts -> groups of windows of equal real lengths, real slots compacted in slot order.

    query (W, Lq) and keys (W, Lk) long: the row behind every slot of every window, query_valid / key_valid bool,
    False at padding slots (whatever row they name); extra (W, C): rows every window's keys read besides its own.
    Groups come most queries first, then most keys; a window without a real query is dropped (nothing to compute).
    """
    if not query.shape[0]:
        return ()
    nq, nk = query_valid.sum(1), key_valid.sum(1)  # (W,) real queries / keys per window
    by_size = torch.sort(nq * (key_valid.shape[1] + 1) + nk, descending=True, stable=True).indices  # (W,)
    q_rows = query.gather(1, _real_first(query_valid))[by_size]  # (W, Lq) real rows first
    k_rows = keys.gather(1, _real_first(key_valid))[by_size]  # (W, Lk)
    if extra is not None:
        extra = extra[by_size]
    sizes, counts = torch.unique_consecutive(torch.stack([nq[by_size], nk[by_size]], 1), dim=0, return_counts=True)
    out, w0 = [], 0
    for (lq, lk), n in zip(sizes.tolist(), counts.tolist()):
        k = k_rows[w0 : w0 + n, :lk]  # (n, lk)
        if extra is not None:
            k = torch.cat([k, extra[w0 : w0 + n]], dim=1)  # (n, lk + C)
        if lq:
            out.append(WindowRows(q_rows[w0 : w0 + n, :lq], k))
        w0 += n
    return tuple(out)


def _real_first(valid: torch.Tensor) -> torch.Tensor:
    """(W, L) slot permutation of every window putting its real slots first, each kind in slot order."""
    return torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices


def gathered_windows_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: WindowRows,
    out: torch.Tensor,
    max_windows: int = 0,
) -> torch.Tensor:
    """Attention inside windows whose rows are gathered from row tables one chunk of windows at a time.

    q (B, Nq, H, D) query rows; k, v (B, Nk, H, D) key/value rows (a window's own rows, then any rows windows read
    besides them, e.g. the proxy's); ``rows``: one group of :func:`group_windows`, every slot real, so no mask.
    Window w's outputs go to rows ``rows.query[w]`` of ``out`` (B, N_out, H, D). Only one chunk's gathered rows
    exist at a time (``max_windows`` > 0 windows per SDPA call; 0 picks it from AUTO_CHUNK_ELEMENTS): one gather
    each of q, k and v straight from the rows, one SDPA call, one row copy of its output into ``out``; no
    window-major copy of a whole layer is made. Writes ``out``, returns it.
    """
    b, h, d = q.shape[0], q.shape[2], q.shape[3]
    nw, lq = rows.query.shape
    lk = rows.keys.shape[1]
    step = max_windows or auto_window_batch(b, nw, lk, h, d)
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        n = w1 - w0
        dst = rows.query[w0:w1].reshape(-1)
        qc = take_rows(q, dst).view(b * n, lq, h, d)  # (B*n, Lq, H, D)
        kc = take_rows(k, rows.keys[w0:w1].reshape(-1)).view(b * n, lk, h, d)  # (B*n, Lk, H, D)
        vc = take_rows(v, rows.keys[w0:w1].reshape(-1)).view(b * n, lk, h, d)
        o = sdpa(qc, kc, vc).reshape(b, n * lq, h, d)  # (B, n*Lq, H, D) window-major rows
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
