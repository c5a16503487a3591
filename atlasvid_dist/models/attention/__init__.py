"""Attention kernels of the detail branch: dense reference, SDPA with windows in the batch, FlexAttention.

See docs/method.md (stage 2)."""
