"""Background I/O for streamed commands: writes (and the sha256 of what is written) done behind
the caller's back on one worker thread.

`WriteBehind` takes each piece, writes it to the file and adds it to the hash on its thread
(both release the GIL), so the caller reads and computes the next piece meanwhile. On Linux the
writeback of every written range is started at once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`,
on a thread of its own, as it waits while the disk's queue is full), so the disk works while
the command computes and the final fsync finds little left to do. Ordering, sizes and the
digest are those of plain sequential writes; an error on the thread is raised by the next
`write` or by `wait`.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

WRITEBACK_EVERY = 32 << 20  # bytes between writeback hints
SLICE = 1 << 19  # bytes written and hashed together
WRITE_CHUNK = 4 << 20  # bytes per write call when not hashed


def _sync_file_range():
    """libc's sync_file_range where there is one (Linux), else None."""
    with contextlib.suppress(Exception):
        import ctypes
        import ctypes.util
        import sys

        if not sys.platform.startswith("linux"):
            return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        f = libc.sync_file_range
        f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return f
    return None


_SYNC_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class WriteBehind:
    """Sequential writes to `f` (and a running sha256 when `hashed`) on a worker thread.

    `write(data)` returns once at most `depth` writes are pending (this one included), so a
    caller that reuses buffers needs `depth + 1` of them: with the default depth of 1, a
    buffer handed to `write` may be refilled after the *next* `write` returns. The bytes of
    `data` must not change until then.
    """

    def __init__(self, f: IO[bytes], *, hashed: bool = True, depth: int = 1):
        self._f = f
        self._hash = hashlib.sha256() if hashed else None
        self._depth = depth
        self._pending: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._hints: ThreadPoolExecutor | None = None  # writeback hints, off the write thread
        self._lock = threading.Lock()
        self.size = 0
        self._hinted = 0  # bytes whose writeback was started
        try:
            self._fd: int | None = f.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None

    def _do(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._hash is None:
            for lo in range(0, len(view), WRITE_CHUNK):  # big writes of cold memory: slower
                self._f.write(view[lo: lo + WRITE_CHUNK])
            return
        for lo in range(0, len(view), SLICE):  # each slice hashed while it is in the cache
            piece = view[lo: lo + SLICE]
            self._f.write(piece)
            self._hash.update(piece)

    def write(self, data: memoryview | bytes) -> int:
        n = memoryview(data).nbytes
        if not self._depth:  # inline: plain writes, with the writeback hints
            self._do(data)
            self.size += n
            if _SYNC_RANGE is not None and self._fd is not None and \
                    self.size - self._hinted >= WRITEBACK_EVERY:
                self._hint(self._hinted, self.size - self._hinted)
                self._hinted = self.size
            return n
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tvtool-write")
        self._pending.append(self._pool.submit(self._do, data))
        self.size += n
        if _SYNC_RANGE is not None and self._fd is not None and \
                self.size - self._hinted >= WRITEBACK_EVERY:
            # on a thread of its own: a hint may wait for a congested disk queue, and neither
            # the writes nor the caller should wait with it (the fsync at the end waits anyway)
            start, self._hinted = self._hinted, self.size  # the thread writes in order
            if self._hints is None:
                self._hints = ThreadPoolExecutor(1, thread_name_prefix="tvtool-writeback")
            self._hints.submit(self._hint_after, self._pending[-1], start, self.size - start)
        while len(self._pending) > self._depth:
            self._pending.popleft().result()
        return n

    def _hint(self, start: int, nbytes: int) -> None:
        with contextlib.suppress(Exception):
            self._f.flush()
            _SYNC_RANGE(self._fd, start, nbytes, _SYNC_FILE_RANGE_WRITE)  # type: ignore[misc]

    def _hint_after(self, written: Future[None], start: int, nbytes: int) -> None:
        """Start the writeback of bytes start.. once the write that ends them is done."""
        with contextlib.suppress(Exception):  # the write's own error reaches the caller
            written.result()
            _SYNC_RANGE(self._fd, start, nbytes, _SYNC_FILE_RANGE_WRITE)  # type: ignore[misc]

    def wait(self) -> None:
        """Every write done (raises the first error a write met)."""
        while self._pending:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        self.wait()
        assert self._hash is not None
        return self._hash.hexdigest()

    def close(self) -> None:
        """Wait for the writes in flight (errors are dropped: use `wait` to see them)."""
        with contextlib.suppress(Exception):
            self.wait()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._hints is not None:
            self._hints.shutdown(wait=True)
            self._hints = None
