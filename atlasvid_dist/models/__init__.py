"""Layer 2: AtlasTransformer around diffusers' WanTransformer3DModel, RoPE, attention kernels, loading, LoRA.

No torch.distributed here. See docs/method.md and docs/architecture.md."""
