"""On CUDA: every attention backend (sdpa, flex) against the dense masked reference, forward (and backward for
sdpa), fp32 and bf16, for unshifted/shifted/padded grids with and without the proxy. Prints and saves max diffs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, save  # noqa: E402

from atlasvid_dist import AtlasConfig  # noqa: E402
from atlasvid_dist.geometry import Grid, ProxyGeometry  # noqa: E402
from atlasvid_dist.models.attention.detail import DetailAttention, ProxyKV  # noqa: E402
from atlasvid_dist.models.rope import Rotary3D  # noqa: E402

CASES = {
    "unshifted": ((6, 30, 32), dict(window=(3, 15, 16), shift=False), 0),
    "shifted": ((6, 30, 32), dict(window=(3, 15, 16), shift=True), 1),
    "padded": ((5, 30, 36), dict(window=(3, 15, 16), shift=True, pad_windows=True), 1),
}


def run(backend, dims, kw, layer, context, proxy, dtype, grad):
    grid = Grid(*dims)
    cfg = AtlasConfig(backend=backend, proxy_context=context, spatial_scale=2, **kw)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, grid.size, 4, 64, device="cuda", dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)
    )
    kv = None
    if proxy:
        pg = ProxyGeometry(grid, 4, 2).grid
        pk, pv = (torch.randn(1, pg.size, 4, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        kv = ProxyKV(pg, [pk, pk], [pv, pv])
    out = DetailAttention(cfg, grid, Rotary3D(64), torch.device("cuda"), kv, (4.0, 2.0, 2.0))(layer, q, k, v)
    grads = None
    if grad:
        out.float().sum().backward()
        grads = [t.grad.float() for t in (q, k, v)]
    return out.detach().float(), grads


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name, (dims, kw, layer) in CASES.items():
        for proxy, context in ((False, "all"), (True, "aligned"), (True, "all")):
            for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
                ref, rgrads = run("reference", dims, kw, layer, context, proxy, dtype, True)
                for backend in ("sdpa", "flex"):
                    grad = backend == "sdpa"
                    out, grads = run(backend, dims, kw, layer, context, proxy, dtype, grad)
                    diff = (out - ref).abs().max().item()
                    gdiff = max((a - b).abs().max().item() for a, b in zip(grads, rgrads)) if grad else None
                    ok = diff < tol and (gdiff is None or gdiff < tol * 10)
                    rows.append(
                        dict(
                            case=name,
                            proxy=proxy,
                            context=context,
                            dtype=str(dtype),
                            backend=backend,
                            max_abs_diff=diff,
                            grad_max_abs_diff=gdiff,
                            ok=ok,
                        )
                    )
                    print(
                        f"{name:9} proxy={proxy!s:5} {context:7} {str(dtype):15} {backend:5} "
                        f"fwd {diff:.2e} grad {gdiff if gdiff is None else f'{gdiff:.2e}'} {'ok' if ok else 'FAIL'}"
                    )
    path = save(
        "cuda-backend-parity",
        {"environment": environment("cuda"), "rows": rows, "all_ok": all(r["ok"] for r in rows)},
        args.out,
    )
    print("saved", path, "all ok:", all(r["ok"] for r in rows))


if __name__ == "__main__":
    main()
