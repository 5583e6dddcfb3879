"""Stage progress on stderr: a rich bar on a terminal, one line per stage otherwise.

The console is bound to the stderr of the moment the display starts, so the commands the demo
runs in-process (whose output is captured into logs) cannot swallow it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

Tick = Callable[[int], None]
StageProgress = Callable[[str, int], Tick]


@contextlib.contextmanager
def stage_progress(quiet: bool = False) -> Iterator[StageProgress]:
    """Yields `start(description, total) -> tick(n)`; each new stage completes the previous one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        yield lambda desc, total: lambda n: None
        return
    console = Console(file=sys.stderr, highlight=False)
    t0 = time.perf_counter()
    if not console.is_terminal:

        def start_line(desc: str, total: int) -> Tick:
            console.print(f"[{time.perf_counter() - t0:6.1f}s] {desc}", markup=False)
            return lambda n: None

        yield start_line
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        current: list = []

        def finish() -> None:
            for task, desc, t in current:
                bar.remove_task(task)
                console.print(f"[green]done[/green] {desc} ({time.perf_counter() - t:.1f} s)")
            current.clear()

        def start(desc: str, total: int) -> Tick:
            finish()
            task = bar.add_task(desc, total=max(total, 1))
            current.append((task, desc, time.perf_counter()))
            return lambda n: bar.advance(task, n)

        yield start
        finish()
