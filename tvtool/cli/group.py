"""The click group class every tvtool (sub-)app uses: maps tvtool errors to exit codes.

Kept apart from `tvtool.cli.app` so command modules can import it without a circular import.
"""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup

from tvtool.errors import TvtoolError


class TvtoolGroup(TyperGroup):
    """Maps tvtool errors to a one-line message and exit code (traceback with TVTOOL_DEBUG=1)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except TvtoolError as e:
            if os.environ.get("TVTOOL_DEBUG") == "1":
                raise
            from rich.markup import escape

            from tvtool.cli.output import err

            err.print(f"[red]Error:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
