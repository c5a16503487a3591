"""Layer 6: the typer commands (generate, plan, demo, train, prepare-data); parse, build a config, run, report.

See docs/architecture.md."""
