"""Run tvtool commands in-process, exactly as a user would type them, capturing their output.

Each command's stdout (its `--json` document or digest) is returned; its stderr (tables, notes)
goes to a log file per stage, so the demo's own display stays readable. A failing command stops
the demo with the command line and the last lines of its stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from pathlib import Path
from typing import Any

from tvtool.errors import TvtoolError


class CliRunner:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.commands: list[dict[str, Any]] = []

    def run(self, log: str, args: list[str]) -> str:
        """`tvtool ARGS...`; returns stdout. Raises TvtoolError when the command fails."""
        import click

        from tvtool.cli.app import app

        args = [str(a) for a in args]
        line = "tvtool " + shlex.join(args)
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        code: Any = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                ret = app(args=args, prog_name="tvtool", standalone_mode=False)
                code = ret if isinstance(ret, int) else 0
            except SystemExit as e:
                code = e.code or 0
            except click.exceptions.Exit as e:
                code = e.exit_code
            except click.ClickException as e:
                e.show(file=err)
                code = e.exit_code
        seconds = time.perf_counter() - t0
        self.commands.append({"stage": log, "command": line, "seconds": round(seconds, 2)})
        with open(self.log_dir / f"{log}.log", "a") as f:
            f.write(f"$ {line}\n# exit {code}, {seconds:.1f} s\n{err.getvalue()}\n")
            f.write(f"# stdout:\n{out.getvalue()}\n")
        if code:
            tail = " | ".join(err.getvalue().strip().splitlines()[-3:])
            raise TvtoolError(f"demo step failed (exit {code}): {line}: {tail}")
        return out.getvalue()

    def json(self, log: str, args: list[str]) -> dict:
        out = self.run(log, [*args, "--json"])
        try:
            return json.loads(out)
        except ValueError:
            raise TvtoolError(f"demo step printed no JSON: tvtool {shlex.join(args)}") from None
