"""Live tensor bytes of a piece of code, measured by a dispatch mode (any device, meta included).

with LiveStorages() as live:
    run()
live.peak   # bytes of storages alive at once, at most, made (or first returned) under the mode
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorages(TorchDispatchMode):
    """Bytes of tensor storages alive, their peak, and the largest convolution input + output seen.

    A storage counts from the first op under the mode that returns a tensor on it (one made before the mode
    counts from then: e.g. the weights, as an op reads them, do not, since a read returns no new tensor of
    theirs) until it is freed. On CPU this is what CUDA's ``max_memory_allocated`` is on a GPU: the tensors'
    own bytes, without the allocator's cache and fragmentation or a library's private workspace (oneDNN's
    reordered copies), which a process's RSS holds besides."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = self.conv_io = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.conv_io = max(self.conv_io, args[0].untyped_storage().nbytes() + out.untyped_storage().nbytes())
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def restart_peak(self) -> int:
        """Start a new peak at what is live now; returns that."""
        self.peak, self.conv_io = self.live, 0
        return self.live
