"""Shared by the bench scripts: the peak-memory footer of a measured child process, and the
table + JSON every script prints and writes.

A bench child is a `python -c` program that sets `t0 = time.perf_counter()`, does one thing, and
ends with PEAK_FOOTER, which prints `<peak RSS bytes> <wall seconds>` (VmHWM from /proc).
"""

from __future__ import annotations

import json
from pathlib import Path

PEAK_FOOTER = """
wall = time.perf_counter() - t0
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
print(hwm, wall)
"""


def print_rows_and_save(rows: list[dict], info: dict, out: Path) -> None:
    """Print the peak-memory table (label, peak RSS, over the import baseline, wall) and
    write `info` (which should hold the rows) as JSON to `out`."""
    print(f"{'mode':<40} {'peak RSS MB':>12} {'over import':>12} {'wall s':>8}")
    for r in rows:
        print(f"{r['label']:<40} {r['peak_rss_mb']:>12.0f} {r['over_import_mb']:>12.0f} "
              f"{r['wall_s']:>8.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")
    if out.resolve().parent == Path(__file__).resolve().parent / "results":
        from table import refresh_readme  # bench/ is on the path of every bench script

        refresh_readme()
