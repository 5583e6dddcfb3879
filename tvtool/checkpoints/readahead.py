"""Read-ahead: a worker thread fills a small ring of reused buffers with a reader's next tensors.

`CheckpointReader.read_into` reads (and, for the content fingerprint, hashes) each tensor on the
worker, slice by slice while it is in the cache; hashlib and `preadv` release the GIL, so the
caller computes on tensor i while tensors i+1, i+2 are read and hashed on the other core. The
buffers are allocated once (`depth` x the largest tensor), so no tensor costs fresh pages.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from tvtool.checkpoints.readers import CheckpointReader


class ReadAhead:
    """The tensors `keys` of `reader`, in order: `take()` gives the next one (a view into a
    ring slot), `release()` hands the oldest taken slot back. A taken tensor stays valid until
    it is released; at most `depth` are read or held at once. Use as a context manager."""

    def __init__(self, reader: CheckpointReader, keys: list[str], depth: int = 3):
        self._reader = reader
        self._metas = [(k, reader.meta(k)) for k in keys]
        size = max((m.numel * _itemsize(m.dtype) for _, m in self._metas), default=0)
        self._slots = [torch.empty(size, dtype=torch.uint8) for _ in range(depth)]
        self._free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for i in range(depth):
            self._free.put(i)
        self._ready: queue.SimpleQueue[tuple[int | None, Any]] = queue.SimpleQueue()
        self._taken: list[int] = []
        self._thread = threading.Thread(target=self._run, name="tvtool-readahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for key, m in self._metas:
                slot = self._free.get()
                if slot is None:  # closed early
                    return
                nbytes = m.numel * _itemsize(m.dtype)
                t = self._slots[slot][:nbytes].view(m.dtype).view(m.shape)
                self._reader.read_into(key, t)
                self._ready.put((slot, t))
        except BaseException as e:  # handed to the caller by `take`
            self._ready.put((None, e))

    def take(self) -> torch.Tensor:
        slot, t = self._ready.get()
        if slot is None:
            raise t
        self._taken.append(slot)
        return t

    def release(self) -> None:
        self._free.put(self._taken.pop(0))

    def close(self) -> None:
        self._free.put(None)
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
