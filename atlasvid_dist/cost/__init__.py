"""The one cost model: tokens, FLOPs, bytes, memory and seconds that plan, pre-flight and benchmarks report."""

from .attention import attention_flops, layer_attention_flops
from .model import CostReport, RunSettings, estimate, full_forward_flops, linear_flops_per_layer
from .profiles import PROFILES, DeviceProfile, device_profile

__all__ = [
    "attention_flops",
    "layer_attention_flops",
    "CostReport",
    "RunSettings",
    "estimate",
    "full_forward_flops",
    "linear_flops_per_layer",
    "DeviceProfile",
    "PROFILES",
    "device_profile",
]
