"""Ring attention over a sequence split in equal shards across a group, with an exact log-sum-exp merge.

Each rank holds q, k, v for its own L_local tokens, (B, H, L_local, D). The key/value blocks travel around the
ring (rank r sends to r+1 and receives from r-1) while every rank attends its queries to the block it holds; the
partial outputs are merged by their log-sum-exp, so the result equals dense attention over the concatenated
sequence (rank order). Optional ``extra_k``/``extra_v`` (B, H, C, D) that every rank holds in full (the proxy's
keys) are one more block in the same merge.

Gradients: a custom autograd Function with a ring backward (the FlashAttention-2 scheme). The backward replays
the ring: every rank computes, for the block it holds, dq and the block's dk/dv from the *global* output and
log-sum-exp saved by the forward, and the block's dk/dv accumulator travels with it until it is back home.
Why not let autograd differentiate through the sends and the merge: the fused kernels return their log-sum-exp
without a gradient, so the merge would be differentiated wrongly, and autograd would keep every visited block
alive (O(L) memory per rank instead of O(L_local)). The per-block kernels live in ``_block_forward`` /
``_block_backward``: the fused CPU flash kernel, the CUDA flash kernel for fp16/bf16, and an explicit matmul
fallback for anything else (any device, any float dtype).

Gradients for ``extra_k``/``extra_v`` are this rank's part (its queries' contribution): the full gradient of a
replicated tensor is their sum over the group, which the caller reduces where the tensor's owner needs it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..errors import InputError
from .comm import CommStats, exchange, group_rank, group_size

_TAG_KV, _TAG_DKV = 1, 2


# -- per-block kernels ------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: per device: the flash forward's (cum_seq_q, cum_seq_k, rng_state, unused) outputs its backward takes back
_FLASH_AUX: dict[torch.device, tuple] = {}


def _use_cuda_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to one key block: (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) in the accumulation dtype)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    elif _use_cuda_flash(q):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
        out, lse = res[0], res[1]
        _FLASH_AUX.setdefault(q.device, (res[2], res[3], res[6], res[7]))
    else:
        return _math_forward(q, k, v, scale)
    return out, lse.to(_acc_dtype(q.dtype))


def _math_forward(q, k, v, scale):
    """Explicit fallback of :func:`_block_forward` (materialises the (Lq, Lk) scores of one block)."""
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.to(acc)).to(q.dtype), lse


def _block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one key block given the *merged* output and log-sum-exp of all blocks."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, scale=scale
        )
    if _use_cuda_flash(q):
        # sequence offsets and RNG state as the forward returned them (undefined/unused: dense, no dropout)
        cum_q, cum_k, seed, offset = _FLASH_AUX[q.device]
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse.float(),
            cum_q,
            cum_k,
            q.shape[-2],
            k.shape[-2],
            0.0,
            False,
            seed,
            offset,
            scale=scale,
        )
    return _math_backward(dout, q, k, v, out, lse, scale)


def _math_backward(dout, q, k, v, out, lse, scale):
    """Explicit fallback of :func:`_block_backward`: P = exp(S - lse), dS = P * (dO V^T - rowsum(dO * O))."""
    acc = _acc_dtype(q.dtype)
    qa, ka, va, doa = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    p = torch.exp(torch.matmul(qa, ka.transpose(-1, -2)) * scale - lse[..., None])  # (B, H, Lq, Lk)
    dv = torch.matmul(p.transpose(-1, -2), doa)
    dp = torch.matmul(doa, va.transpose(-1, -2))
    ds = p * (dp - (doa * out.to(acc)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, ka) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qa) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _merge(out: torch.Tensor | None, lse: torch.Tensor | None, o: torch.Tensor, lse_b: torch.Tensor):
    """Fold one block's (o, lse_b) into the running (out, lse), both in the accumulation dtype."""
    o = o.to(lse_b.dtype)
    if out is None:
        return o, lse_b
    new = torch.logaddexp(lse, lse_b)
    return out * torch.exp(lse - new)[..., None] + o * torch.exp(lse_b - new)[..., None], new


# -- the ring ---------------------------------------------------------------------------------------------------
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, group, scale, stats, step, timeout):
        n, r = group_size(group), group_rank(group)
        nxt, prv = (r + 1) % n, (r - 1) % n
        out = lse = None
        if extra_k is not None:
            out, lse = _merge(out, lse, *_block_forward(q, extra_k, extra_v, scale))
        kv = torch.stack([k, v])  # (2, B, H, L, D): one message per hop
        for s in range(n):
            pending, incoming = None, None
            if s < n - 1:
                incoming = torch.empty_like(kv)
                pending = exchange(
                    [(nxt, kv)],
                    [(prv, incoming)],
                    group,
                    stats=stats,
                    category="ring.fwd",
                    step=step,
                    timeout=timeout,
                    block=False,
                    tag=_TAG_KV,
                )
            out, lse = _merge(out, lse, *_block_forward(q, kv[0], kv[1], scale))
            if pending is not None:
                pending.wait()
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
        ctx.group, ctx.scale, ctx.stats, ctx.step, ctx.timeout = group, scale, stats, step, timeout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        group, scale, stats, step, timeout = ctx.group, ctx.scale, ctx.stats, ctx.step, ctx.timeout
        n, r = group_size(group), group_rank(group)
        nxt, prv = (r + 1) % n, (r - 1) % n
        acc = lse.dtype
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dek = dev = None
        if extra_k is not None:
            dq_e, dek, dev = _block_backward(dout, q, extra_k, extra_v, out, lse, scale)
            dq += dq_e
        kv = torch.stack([k, v])  # (2, B, H, L, D)
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # gradient of the block held, accumulated
        dkv_pending, dkv_in = None, None
        for s in range(n):
            kv_pending, kv_in = None, None
            if s < n - 1:
                kv_in = torch.empty_like(kv)
                kv_pending = exchange(
                    [(nxt, kv)],
                    [(prv, kv_in)],
                    group,
                    stats=stats,
                    category="ring.bwd",
                    step=step,
                    timeout=timeout,
                    block=False,
                    tag=_TAG_KV,
                )
            dq_s, dk_s, dv_s = _block_backward(dout, q, kv[0], kv[1], out, lse, scale)
            dq += dq_s
            if dkv_pending is not None:  # the accumulator that travelled with this block from the ranks before us
                dkv_pending.wait()
                dkv = dkv_in
            dkv[0] += dk_s
            dkv[1] += dv_s
            if n > 1:
                dkv_in = torch.empty_like(dkv)
                dkv_pending = exchange(
                    [(nxt, dkv)],
                    [(prv, dkv_in)],
                    group,
                    stats=stats,
                    category="ring.bwd",
                    step=step,
                    timeout=timeout,
                    block=False,
                    tag=_TAG_DKV,
                )
            if kv_pending is not None:
                kv_pending.wait()
                kv = kv_in
        if dkv_pending is not None:  # after n hops our own block's accumulator is back
            dkv_pending.wait()
            dkv = dkv_in
        dk, dv = dkv[0].to(k.dtype), dkv[1].to(v.dtype)
        if dek is not None:
            dek, dev = dek.to(extra_k.dtype), dev.to(extra_v.dtype)
        return dq.to(q.dtype), dk, dv, dek, dev, None, None, None, None, None


def ring_attention(
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
    """Dense attention of the local queries over the whole (concatenated, rank-ordered) sequence of the group.

    q, k, v: (B, H, L_local, D), the same L_local on every rank. extra_k, extra_v: (B, H, C, D), keys every rank
    holds in full, merged in as one more block. ``scale`` defaults to 1/sqrt(D). ``step`` labels timeout errors;
    ``timeout`` (seconds) bounds every wait. Returns (B, H, L_local, D). Bytes sent are counted under
    ``ring.fwd`` and ``ring.bwd`` in ``stats``.
    """
    _check_inputs(q, k, v, extra_k, extra_v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, extra_k, extra_v, group, scale, stats, step, timeout)


def _check_inputs(q, k, v, extra_k, extra_v) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise InputError(
            f"ring_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
            f"(B, H, L_local, D) with the same B, H, D (and k, v of one shape)"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise InputError(f"ring_attention: empty local shard (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if (extra_k is None) != (extra_v is None):
        raise InputError("ring_attention: give both extra_k and extra_v, or neither")
    if extra_k is not None and (
        extra_k.shape != extra_v.shape
        or extra_k.dim() != 4
        or extra_k.shape[:2] != q.shape[:2]
        or extra_k.shape[-1] != q.shape[-1]
    ):
        raise InputError(
            f"ring_attention: extra_k {tuple(extra_k.shape)}, extra_v {tuple(extra_v.shape)} must be "
            f"(B, H, C, D) with q's B, H, D {tuple(q.shape[:2])}, {q.shape[-1]}"
        )
