"""The `tvtool` application. Importing this module must not import torch."""

from __future__ import annotations

import os
from typing import Any

import click
import typer
from typer.core import TyperGroup

from tvtool import __version__
from tvtool.errors import TvtoolError

COMMAND_MODULES = (
    "extract_cmd",
    "inspect_cmd",
    "merge_cmd",
    "compose_cmd",
    "select_cmd",
    "eval_cmd",
    "store_cmd",
    "demo_cmd",
)


class TvtoolGroup(TyperGroup):
    """Maps tvtool errors to a one-line message and exit code (traceback with TVTOOL_DEBUG=1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TvtoolError as e:
            if os.environ.get("TVTOOL_DEBUG") == "1":
                raise
            from tvtool.cli.output import err

            err.print(f"[red]Error:[/red] {e}", soft_wrap=True, markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=TvtoolGroup,
    name="tvtool",
    help="Task-vector management: extract, store, inspect, select, compose (aTLAS) and merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tvtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Task-vector management: extract, store, inspect, select, compose (aTLAS) and merge.

    Exit codes: 0 ok, 1 user error, 2 usage error, 3 integrity failure.
    """


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"tvtool.cli.{name}").register(app)


_register()


def main() -> None:
    app(prog_name="tvtool")
