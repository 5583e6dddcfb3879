"""Stale part files of tvtool's own writers, anywhere on disk (for `tvtool clean`). Torch-free.

Outputs outside the store (`merge --out`, `store export -o`) are written to a hidden
`.NAME.<8 hex>.part` beside the target and renamed onto it when complete. A process killed with
SIGKILL (or a machine that lost power) leaves that file behind. Only files of exactly that
naming, not links, and not modified within the grace period (a live writer keeps its part
file's mtime fresh) are candidates.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tvtool.errors import TvtoolError

PART = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.part")


@dataclass
class CleanReport:
    removed: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    bytes: int = 0
    dry_run: bool = False


def is_part_file(path: Path) -> bool:
    return bool(PART.fullmatch(path.name))


def stale_parts(
    dirs: list[Path], grace_seconds: float, *, recursive: bool = False, dry_run: bool = False
) -> CleanReport:
    """Remove (or with `dry_run` list) part files in `dirs` older than the grace period."""
    report = CleanReport(dry_run=dry_run)
    cutoff = time.time() - grace_seconds
    for d in dirs:
        if not d.is_dir():
            raise TvtoolError(f"{d} is not a directory")
        for path in _candidates(d, recursive):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if st.st_mtime > cutoff:
                report.kept_recent.append(str(path))
                continue
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise TvtoolError(f"cannot remove {path}: {e.strerror or e}") from None
            report.removed.append(str(path))
            report.bytes += st.st_size
    return report


def _candidates(root: Path, recursive: bool) -> list[Path]:
    out = []
    for top, dirs, files in os.walk(root):
        out += [Path(top) / f for f in files if PART.fullmatch(f)]
        if not recursive:
            break
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(top, d)))
    return sorted(p for p in out if p.is_file() and not p.is_symlink())
