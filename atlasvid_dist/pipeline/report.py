"""What a run measured, in a form a program can read (``generate --json``): memory peaks, the model used, medians.

peak_memory("cpu")      # {'cpu_max_rss_bytes': 812345344, 'cuda_max_allocated_bytes': None}
model_info("tiny")      # {'name': 'tiny', 'folder': None, 'random_weights': True}
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def peak_memory(device: str) -> dict:
    """This process's peaks: host max RSS (``getrusage``) and, on CUDA, ``torch.cuda.max_memory_allocated``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports kilobytes, macOS bytes
    cuda = None
    if device == "cuda":
        import torch

        cuda = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    return {"cpu_max_rss_bytes": int(rss), "cuda_max_allocated_bytes": cuda}


def model_info(model: str) -> dict:
    """The model a run used: 'tiny' is the built-in model with random (seeded) weights; anything else is a folder
    of trained weights."""
    if str(model) == "tiny":
        return {"name": "tiny", "folder": None, "random_weights": True}
    folder = Path(model).resolve()
    return {"name": folder.name, "folder": str(folder), "random_weights": False}


def median(values) -> float | None:
    """The median of ``values`` (the upper one of an even count, as the ranks report theirs); None when empty."""
    values = sorted(values)
    return float(values[len(values) // 2]) if values else None


def path_or_none(path: str | None) -> str | None:
    """An output's absolute path, None when the run did not write it."""
    return os.path.abspath(path) if path else None
