"""The one cost model: tokens, FLOPs, bytes, memory and seconds that plan, pre-flight and benchmarks report."""
