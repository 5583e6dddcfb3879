"""Stage progress on stderr: a rich bar on a terminal, one line per stage otherwise."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Tick = Callable[[int], None]
StageProgress = Callable[[str, int], Tick]


@contextlib.contextmanager
def stage_progress(quiet: bool = False) -> Iterator[StageProgress]:
    """Yields `start(description, total) -> tick(n)`; each new stage completes the previous one."""
    from tvtool.cli.output import err, info
    from tvtool.cli.output import progress as rich_progress

    if quiet:
        yield lambda desc, total: lambda n: None
        return
    if not err.is_terminal:
        t0 = time.perf_counter()

        def start_line(desc: str, total: int) -> Tick:
            info(f"[{time.perf_counter() - t0:6.1f}s] {desc}")
            return lambda n: None

        yield start_line
        return
    with rich_progress() as bar:
        current: list = []

        def finish() -> None:
            for task, desc, t in current:
                bar.remove_task(task)
                bar.console.print(f"[green]done[/green] {desc} ({time.perf_counter() - t:.1f} s)")
            current.clear()

        def start(desc: str, total: int) -> Tick:
            finish()
            task = bar.add_task(desc, total=max(total, 1))
            current.append((task, desc, time.perf_counter()))
            return lambda n: bar.advance(task, n)

        yield start
        finish()
