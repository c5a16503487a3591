"""The `atlasvid-dist` command: parse, build the configuration, call the layer below, map errors to exit codes.

Exit codes: 0 success; 2 invalid input or configuration, or a plan that cannot run (the message names what and
why, also for unknown options, which typer reports); 1 a failure while running. A typed error prints one
``error: ...`` line on stderr and no traceback, whether the app runs from ``main()`` or a test's CliRunner.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from ..errors import AtlasError
from .demo import demo
from .eval import evaluate
from .generate import generate
from .plan import plan
from .train import prepare_data, train
from .world import world_app


class _AtlasGroup(TyperGroup):
    """The command group: a typed error from any command becomes its exit code and one `error:` line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AtlasError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_AtlasGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # help panels; help texts with brackets are escaped (options.with_default)
    help="AtlasVid ultra-high-resolution long video generation on Wan2.1, distributed with Ray.",
)


@app.callback()
def _root() -> None:
    """AtlasVid ultra-high-resolution long video generation on Wan2.1, distributed with Ray."""


app.command("generate")(generate)
app.command("plan")(plan)
app.command("demo")(demo)
app.command("train")(train)
app.command("prepare-data")(prepare_data)
app.command("eval")(evaluate)
app.add_typer(world_app, name="world")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a typed error becomes one `error:` line on stderr and its exit code, no traceback."""
    try:
        app(args=argv, prog_name="atlasvid-dist")
    except AtlasError as exc:  # raised outside a command (none today); same mapping
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
