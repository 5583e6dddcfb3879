"""The one output sink: a command's report goes out as data on stdout (one JSON document with
`--json`; digests, names or rows otherwise) and as a human view on stderr.

Human output is safe to print: text that comes from files (tensor names, metadata, ref names) is
shown with terminal controls (ESC, OSC, C0/C1) as visible escapes and rich markup (``[red]``) as
literal text. Tables wrap in a terminal and are plain tab-separated rows elsewhere, so digests and
names are never cut; progress bars appear only when stderr is a terminal.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from tvtool.errors import printable

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

SHORT = 12  # hex characters of a digest people read in a terminal
LINES = "\t\n"  # what human output keeps of the characters `printable` escapes


def plain(text: Any) -> str:
    """`text` for a rich markup string: controls escaped (`printable`) and ``[...]`` literal."""
    from rich.markup import escape

    return escape(printable(text, LINES))


def short(digest: str | None) -> str:
    """A digest for people: 12 hex characters in a terminal, whole elsewhere (logs, pipes)."""
    if not digest:
        return ""
    return digest[:SHORT] if err.is_terminal else digest


def emit_json(doc: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def emit_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def emit(
    report: Any,
    *,
    json_out: bool = False,
    quiet: bool = False,
    human: Callable[[Any], None] | None = None,
    data: Iterable[str] = (),
    quiet_data: Iterable[str] | None = None,
) -> None:
    """Send a command's report out. `--json`: the report (a `tvtool.request.Report`, whose
    `doc()` it prints, another pydantic model or a JSON-able dict) as one document on stdout,
    nothing else. Otherwise `human(report)` writes the people's view
    (on stderr, skipped with `-q`) and the `data` lines go to stdout (`quiet_data` instead with
    `-q`, when given), so `$(tvtool ...)` and pipes get only data."""
    if json_out:
        emit_json(report)
        return
    if not quiet and human is not None:
        human(report)
    for line in quiet_data if quiet and quiet_data is not None else data:
        emit_line(line)


def _default(o: Any) -> Any:
    from tvtool.request import Report

    if isinstance(o, Report):
        return o.doc()
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


@dataclass(frozen=True)
class Col:
    """A table column: `digest` columns show 12 hex characters in a terminal, whole elsewhere."""

    name: str
    justify: str = "left"
    digest: bool = False


@dataclass(frozen=True)
class Cell:
    """A cell with a rich style (the text itself is never read as markup)."""

    text: str
    style: str = ""


def table(
    columns: Sequence[Col | str],
    rows: Iterable[Sequence[Any]],
    title: str | None = None,
    caption: str | None = None,
    console: Console | None = None,
) -> None:
    """Print a table on `console` (stderr by default). In a terminal: a rich table whose cells
    wrap, never cut. Elsewhere: a ``# title`` line (on stderr only), a header and one
    tab-separated row per line, every value whole (tabs and newlines in values become spaces)."""
    con = console or err
    cols = [c if isinstance(c, Col) else Col(c) for c in columns]
    rows = [list(r) for r in rows]
    if not con.is_terminal:
        lines = [f"# {printable(title, LINES)}"] if title and con is err else []
        lines.append("\t".join(c.name for c in cols))
        lines += ["\t".join(_tsv(_text(v)) for v in r) for r in rows]
        if caption and con is err:
            lines.append(f"# {printable(caption, LINES)}")
        con.file.write("\n".join(lines) + "\n")
        con.file.flush()
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, caption=caption, title_justify="left")
    for c in cols:
        t.add_column(c.name, justify=c.justify, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        cells = []
        for c, v in zip(cols, r, strict=True):
            text = _text(v)
            if c.digest and len(text) > SHORT and all(ch in "0123456789abcdef" for ch in text):
                text = text[:SHORT]
            cells.append(Text(printable(text, LINES), style=v.style if isinstance(v, Cell) else ""))
        t.add_row(*cells)
    con.print(t)


def _text(v: Any) -> str:
    return v.text if isinstance(v, Cell) else ("" if v is None else str(v))


def _tsv(text: str) -> str:
    return printable(text.replace("\t", " ").replace("\n", " "))


def finite(x: float | None) -> float | None:
    """JSON has no NaN/Inf: map them to null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress(**kwargs: Any):
    """A rich progress bar on stderr, hidden when stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
        **kwargs,
    )


def warn(msg: str) -> None:
    """A warning for people on stderr (`msg` is plain text, never markup)."""
    err.print("[yellow]warning:[/yellow] " + plain(msg), soft_wrap=True)


def info(msg: str) -> None:
    """A line for people on stderr (`msg` is plain text, never markup)."""
    err.print(printable(msg, LINES), soft_wrap=True, markup=False)


def stored(what: str, digest: str | None, name: str | None = None, extra: str = "") -> None:
    """The people's line for a stored result: ``coefs 3f2a...  tagged NAME``."""
    info(f"{what} {short(digest)}{extra}" + (f"  tagged {name}" if name else ""))
