"""Device profiles for the cost model: peak FLOP/s, the fraction of it our kernels reach, memory, link bandwidth.

Presets are settings, not measurements of the machine the plan runs on (except the CPU preset's memory, read
from this machine); a YAML/JSON file with the same fields (``--device-profile my_gpu.yaml``) replaces them. Sources of the preset numbers are given per field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config.files import from_mapping, read_mapping
from ..errors import check

GiB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator (or a CPU host) as the cost model sees it."""

    name: str
    """Preset name or the file it was read from."""
    peak_flops: float
    """Dense 16-bit (bf16/fp16) matmul peak, FLOP/s."""
    peak_flops_fp32: float
    """fp32 peak, FLOP/s (TF32 tensor cores on NVIDIA: what cuDNN convs and allowed matmuls use)."""
    efficiency: float
    """Fraction of peak reached by dense matmuls and full (flash) attention."""
    window_efficiency: float
    """Fraction of peak reached by window attention (small (720 + context)-key blocks)."""
    memory_bytes: int
    """Memory per device (per GPU; on CPU the host memory every worker shares)."""
    usable_fraction: float = 0.92
    """Part of ``memory_bytes`` a run may plan for (runtime context, allocator fragmentation, comm buffers)."""
    nvlink_bytes_per_s: float = 300e9
    """Achieved point-to-point / all-to-all bandwidth per rank between GPUs of one node (NVLink), bytes/s."""
    ib_bytes_per_s: float = 40e9
    """Achieved bandwidth per rank between nodes (InfiniBand, one NIC per GPU), bytes/s."""
    shared_memory: bool = False
    """True when all workers share one memory (CPU host): the fit check then sums over workers."""
    conv_workspace: float = 0.7
    """Workspace the convolution library takes inside a VAE convolution, as a multiple of that convolution's input
    + output (``VaeDecodeCost.conv_io_bytes_per_tile_pixel``). cuDNN: 0.7, fitted on the one measurement of Wan2.1's
    VAE on an H100 (22.2 KiB per pixel of a 256 px tile, cache included, against 19.1 KiB traced). oneDNN (CPU):
    1.0, a blocked-layout copy of the input and of the output."""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "peak_flops_fp32", "memory_bytes", "nvlink_bytes_per_s", "ib_bytes_per_s"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, name, v, "must be > 0")
        check(
            isinstance(self.conv_workspace, (int, float)) and self.conv_workspace >= 0,
            "conv_workspace",
            self.conv_workspace,
            "must be >= 0",
        )
        for name in ("efficiency", "window_efficiency", "usable_fraction"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and 0 < v <= 1, name, v, "must be in (0, 1]")

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_fraction)


#: Host memory assumed when the machine cannot tell (no sysconf, no cgroup limit readable).
FALLBACK_HOST_MEMORY = 32 * GiB
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes() -> int:
    """Memory of this machine: physical RAM (sysconf), lowered to the container's cgroup limit when one is set;
    FALLBACK_HOST_MEMORY when neither can be read."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 0
    limits = [physical] if physical > 0 else []
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 2**60:  # 'max' or a huge number: no limit
            limits.append(int(text))
    return min(limits) if limits else FALLBACK_HOST_MEMORY


PROFILES: dict[str, DeviceProfile] = {
    # H100 SXM: 989 TFLOP/s dense bf16, 495 TF32 (NVIDIA datasheet); 81,559 MiB as nvidia-smi reports it.
    # efficiency 0.55: our dense attention ran at 516-549 TFLOP/s (benchmarks/results/attention-wan-*-cuda-bf16);
    # window_efficiency 0.08: the windowed kernel reached 64-100 TFLOP/s there. NVLink 4: 450 GB/s per direction
    # (300e9 planned as achieved); InfiniBand NDR: 400 Gb/s = 50 GB/s per GPU NIC (40e9 planned). Not measured here.
    "h100": DeviceProfile(
        "h100",
        peak_flops=989e12,
        peak_flops_fp32=495e12,
        efficiency=0.55,
        window_efficiency=0.08,
        memory_bytes=81_559 * 2**20,
        nvlink_bytes_per_s=300e9,
        ib_bytes_per_s=40e9,
    ),
    # H200: same compute as H100, 141 GB HBM3e (143,771 MiB), same NVLink and InfiniBand.
    "h200": DeviceProfile(
        "h200",
        peak_flops=989e12,
        peak_flops_fp32=495e12,
        efficiency=0.55,
        window_efficiency=0.08,
        memory_bytes=143_771 * 2**20,
        nvlink_bytes_per_s=300e9,
        ib_bytes_per_s=40e9,
    ),
    # A small CPU host (2 AVX2 cores ~ 0.1 TFLOP/s fp32, no fast bf16), gloo over loopback; its memory is this
    # machine's (host_memory_bytes), shared by all workers. A profile file with memory_bytes overrides it.
    "cpu": DeviceProfile(
        "cpu",
        peak_flops=1e11,
        peak_flops_fp32=1e11,
        efficiency=0.3,
        window_efficiency=0.2,
        memory_bytes=host_memory_bytes(),
        usable_fraction=0.8,
        nvlink_bytes_per_s=2e9,
        ib_bytes_per_s=2e9,
        shared_memory=True,
        conv_workspace=1.0,
    ),
}


def device_profile(name: str) -> DeviceProfile:
    """A preset (h100 | h200 | cpu) or a YAML/JSON file with DeviceProfile's fields."""
    key = str(name).strip().lower()
    if key in PROFILES:
        return PROFILES[key]
    check(
        Path(name).suffix.lower() in (".yaml", ".yml", ".json"),
        "device_profile",
        name,
        f"use a preset ({'|'.join(PROFILES)}) or a .yaml/.json file with DeviceProfile's fields",
    )
    data = read_mapping(name)
    return from_mapping(DeviceProfile, {"name": str(name), **data}, source=str(name))
