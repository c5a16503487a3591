"""The `atlasvid-dist` command: parse, build the configuration, call the layer below, map errors to exit codes.

Exit codes: 0 success; 2 invalid input or configuration (the message names what and why, also for unknown
options, which typer reports); 1 a failure while running.
"""

from __future__ import annotations

import sys

import typer

from ..errors import AtlasError
from .demo import demo
from .generate import generate

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="AtlasVid ultra-high-resolution long video generation on Wan2.1, distributed with Ray.")


@app.callback()
def _root() -> None:
    """AtlasVid ultra-high-resolution long video generation on Wan2.1, distributed with Ray."""


app.command("generate")(generate)
app.command("demo")(demo)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a typed error becomes one `error:` line on stderr and its exit code, no traceback."""
    try:
        app(args=argv, prog_name="atlasvid-dist")
    except AtlasError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
