"""Layer 4: the stages of a run (text, proxy, detail, decode, mp4), sampling, checkpoints, run folders, outputs.

See docs/architecture.md (from prompt to pixel)."""
