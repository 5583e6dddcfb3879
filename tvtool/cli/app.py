"""The `tvtool` application. Importing this module must not import torch."""

from __future__ import annotations

import typer

from tvtool import __version__
from tvtool.cli.group import new_app

# Each module has `register(app)`; imported by name, so the demo (a room above the CLI, which
# drives it) registers its command without the CLI importing it.
COMMAND_MODULES = (
    "tvtool.cli.extract_cmd",
    "tvtool.cli.inspect_cmd",
    "tvtool.cli.merge_cmd",
    "tvtool.cli.compose_cmd",
    "tvtool.cli.select_cmd",
    "tvtool.cli.eval_cmd",
    "tvtool.cli.store_cmd",
    "tvtool.cli.datasets_cmd",
    "tvtool.cli.clean_cmd",
    "tvtool.demo.command",
)


app = new_app(
    "tvtool",
    "Task-vector management: extract, store, inspect, select, compose (aTLAS) and merge.",
    pretty_exceptions_enable=False,
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
        importlib.import_module(name).register(app)


_register()


def main() -> None:
    app(prog_name="tvtool")
