"""The C library's allocator settings of a run's processes (host memory; on CPU, the tensors' memory too).

glibc serves a large allocation with its own mapping and unmaps it when freed, but it raises that size threshold
each time such a block is freed (up to 32 MiB); later tensors below the new threshold come from the heap, where
freed memory stays in the process. A peak RSS then reflects which sizes came and went in which order, not what
was alive. Fixing the threshold (``GenerateConfig.host_mmap_threshold``) keeps large tensors in mappings of their
own for the whole run: each is returned when freed, at the cost of a page fault per fresh page.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (malloc.h); setting it turns glibc's dynamic raise off."""


def fix_mmap_threshold(threshold: int) -> bool:
    """Fix this process's mmap threshold at ``threshold`` bytes (0: leave the library's default). Returns whether
    the C library took it (False where it is not glibc)."""
    if threshold <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


__all__ = ["fix_mmap_threshold"]
