"""FlexAttention backend: the window + proxy pattern as a block mask over the window-major sequence (CUDA).

On CPU FlexAttention only runs compiled and forward-only; the SDPA backend is the CPU path. Imported lazily.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_BLOCK_MASKS: dict = {}


@lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(key, window_tokens: int, valid: torch.Tensor, proxy_tokens: int, table: torch.Tensor | None):
    if key in _BLOCK_MASKS:
        return _BLOCK_MASKS[key]
    from torch.nn.attention.flex_attention import create_block_mask

    lw = valid.numel()

    def mask_mod(b, h, q_idx, kv_idx):
        in_detail = kv_idx < lw
        kd = torch.clamp(kv_idx, max=lw - 1)
        detail_ok = (kd // window_tokens == q_idx // window_tokens) & valid[kd]
        if proxy_tokens == 0:
            return in_detail & detail_ok
        if table is None:
            proxy_ok = ~in_detail
        else:
            p = torch.clamp(kv_idx - lw, min=0)
            proxy_ok = table[q_idx // window_tokens, p] & ~in_detail
        return (in_detail & detail_ok) | proxy_ok

    # _compile=True builds the block mask blockwise instead of evaluating a dense (Lq, Lk) mask (477 GB at 4K)
    mask = create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=lw, KV_LEN=lw + proxy_tokens, device=valid.device, _compile=True
    )
    if len(_BLOCK_MASKS) > 64:
        _BLOCK_MASKS.clear()
    _BLOCK_MASKS[key] = mask
    return mask


def flex_windows(
    qw: torch.Tensor,
    kw: torch.Tensor,
    vw: torch.Tensor,
    valid: torch.Tensor,
    pk: torch.Tensor | None,
    pv: torch.Tensor | None,
    table: torch.Tensor | None,
    key,
) -> torch.Tensor:
    """qw, kw, vw (B, W, L, H, D) window-major; pk, pv (B, Np, H, D) or None; table (W, Np) or None (all).

    Returns (B, W, L, H, D).
    """
    b, nw, lw, h, d = qw.shape
    q = qw.flatten(1, 2)  # (B, W*L, H, D)
    k, v = kw.flatten(1, 2), vw.flatten(1, 2)
    np_ = 0
    if pk is not None:
        np_ = pk.shape[1]
        k, v = torch.cat([k, pk], 1), torch.cat([v, pv], 1)  # (B, W*L + Np, H, D)
    mask = _block_mask(key, lw, valid.flatten(), np_, table)
    out = _compiled()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)  # (B, H, W*L, D)
    return out.transpose(1, 2).unflatten(1, (nw, lw))
