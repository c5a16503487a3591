"""Layer 5: LoRA training of the two stages under DeepSpeed ZeRO (peft adapters, flow matching, prepared shards).

See docs/method.md (training)."""
