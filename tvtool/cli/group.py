"""The click group class every tvtool (sub-)app uses: maps tvtool errors to exit codes and shows
real metavars in help.

Kept apart from `tvtool.cli.app` so command modules can import it without a circular import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperGroup

from tvtool.errors import TvtoolError

SCALARS = {str: "TEXT", int: "INT", float: "FLOAT"}


def metavar(param: Any) -> str | None:
    """What a parameter's value looks like in help: DIR, FILE, PATH, INT, FLOAT, TEXT, a|b|c, a
    metavar the declaration gives, or nothing for a flag (the library's default prints Python
    types such as ``<bool>`` or ``<list[str]>``)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if param.metavar:
        return param.metavar
    desc = param.type_descriptor
    info = desc.parameter_info
    ann = desc.annotation
    if desc.is_choice:
        label = "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    elif desc.is_tuple:
        label = " ".join(_scalar(a, info) for a in get_args(ann))
    else:
        label = _scalar(get_args(ann)[0] if get_origin(ann) is list else ann, info)
    return label + ("..." if isinstance(param, typer.core.TyperArgument) and param.nargs != 1
                    else "")


def _scalar(ann: Any, info: Any) -> str:
    if ann is Path:
        if getattr(info, "file_okay", True) is False:
            return "DIR"
        if getattr(info, "dir_okay", True) is False:
            return "FILE"
        return "PATH"
    return SCALARS.get(ann, getattr(ann, "__name__", str(ann)).upper())


def _label(params: list[Any]) -> list[Any]:
    for p in params:
        if hasattr(p, "type_descriptor") and not getattr(p, "_tvtool_metavar", False):
            label = metavar(p)
            p.display_type_rich = lambda ctx, label=label: label
            p._tvtool_metavar = True
    return params


def show_metavars(cmd: Any) -> Any:
    """Make every parameter of `cmd` (--help included) print `metavar(param)` in help."""
    if cmd is not None and not getattr(cmd, "_tvtool_metavars", False):
        get_params = cmd.get_params
        cmd.get_params = lambda ctx: _label(get_params(ctx))
        cmd._tvtool_metavars = True
    return cmd


class TvtoolGroup(TyperGroup):
    """Maps tvtool errors to a one-line message and exit code (traceback with TVTOOL_DEBUG=1)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return show_metavars(super().get_command(ctx, cmd_name))

    def get_params(self, ctx: Any) -> list[Any]:
        return _label(super().get_params(ctx))

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TvtoolError as e:
            if os.environ.get("TVTOOL_DEBUG") == "1":
                raise
            from tvtool.cli.output import err, plain

            err.print("[red]Error:[/red] " + plain(str(e)), soft_wrap=True, highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def new_app(name: str, help: str, **kwargs: Any) -> typer.Typer:
    """A tvtool (sub-)app: the TvtoolGroup, rich help, ``-h``, help when called bare."""
    return typer.Typer(
        cls=TvtoolGroup,
        name=name,
        help=help,
        no_args_is_help=True,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"]},
        **kwargs,
    )
