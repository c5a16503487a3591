"""Layer 3: model-agnostic distributed pieces: window sharding, halo exchange, Ulysses, ring attention, split windows.

See docs/distribution.md."""
