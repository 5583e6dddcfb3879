"""File-level building blocks of the store: advisory locks, fsync, existing-blob checks.

Locks are `flock`s on open files: gc takes a file only when it can lock it exclusively, so a
write in flight (which holds its temp file, later its blob, locked) is never swept, and a
killed writer leaves nothing locked behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_locked(path: Path) -> IO[bytes]:
    """Create `path` exclusively and hold an advisory lock on it while it is open.

    gc skips temp files and blobs it cannot lock, so it never sweeps a write in flight; the
    lock goes with the open file, so a killed writer leaves nothing locked.
    """
    while True:
        f = open(path, "xb")  # noqa: SIM115
        lock_file(f, exclusive=True)
        if os.fstat(f.fileno()).st_nlink > 0:
            return f
        f.close()  # gc swept it between create and lock: the name is free again


def lock_file(f: IO[bytes], *, exclusive: bool, blocking: bool = True) -> bool:
    """An flock on an open file; False when `blocking` is off and someone else holds it."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return True
    flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if not blocking:
        flags |= fcntl.LOCK_NB
    try:
        fcntl.flock(f.fileno(), flags)
    except BlockingIOError:
        return False
    return True


def open_whole_blob(blob: Path, size: int) -> IO[bytes] | None:
    """Open and share-lock an existing blob of the expected size; None if absent (or swept
    by gc meanwhile) or of the wrong size (then the caller's copy replaces it)."""
    try:
        f = open(blob, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    lock_file(f, exclusive=False)
    st = os.fstat(f.fileno())
    if st.st_nlink == 0 or st.st_size != size:
        f.close()
        return None
    return f


def touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
