"""Output helpers: data on stdout (JSON or quiet digests), people's output on stderr."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False)


def emit_json(doc: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def emit_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


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
    err.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)


def info(msg: str) -> None:
    err.print(msg, soft_wrap=True)
