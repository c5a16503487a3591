"""Connected components of a boolean mask in numpy (scipy is not a dependency): union-find over the edges between
4-neighbours, vectorised (hook every edge's larger root under its smaller one, then compress paths; repeat)."""

from __future__ import annotations

import numpy as np


def _edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (p, q) of every pair of 4-adjacent foreground pixels."""
    h, w = mask.shape
    idx = np.arange(h * w).reshape(h, w)
    right = mask[:, :-1] & mask[:, 1:]  # (H, W-1)
    down = mask[:-1, :] & mask[1:, :]  # (H-1, W)
    p = np.concatenate([idx[:, :-1][right], idx[:-1, :][down]])
    q = np.concatenate([idx[:, 1:][right], idx[1:, :][down]])
    return p, q


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) labels (0 background, 1..n in raster order of each component's first pixel) and n."""
    mask = np.asarray(mask, bool)
    parent = np.arange(mask.size)
    p, q = _edges(mask)
    while p.size:
        rp, rq = parent[p], parent[q]
        if np.array_equal(rp, rq):
            break
        np.minimum.at(parent, np.maximum(rp, rq), np.minimum(rp, rq))  # hook roots: parent[x] <= x, no cycles
        parent = _compress(parent)
    roots = parent.reshape(mask.shape)[mask]
    uniq, inverse = np.unique(roots, return_inverse=True)
    labels = np.zeros(mask.shape, np.int64)
    labels[mask] = inverse.ravel() + 1
    return labels, int(uniq.size)
