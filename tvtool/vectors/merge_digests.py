"""Content fingerprints of a merge's inputs from the bytes it streams anyway (no second read).

The recipe records the content fingerprint (`tvtool.checkpoints.fingerprint`) of the base and
of every checkpoint term. Where the merge reads a tensor's raw bytes in order (slices or whole,
`merge_rows`), it feeds them to that tensor's sha256 on the thread that read them (hashlib
releases the GIL: the hashing runs beside the arithmetic); the tensors it never read whole
(untouched keys of a term, non-float ones) are hashed at the end by positioned reads. The
values are those of `CheckpointReader.fingerprint`: the same bytes in the same order.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from tvtool.checkpoints.fingerprint import content_fingerprint

if TYPE_CHECKING:
    from tvtool.checkpoints.readers import CheckpointReader
    from tvtool.vectors.slice_reader import SliceReader

STEP = 1 << 22  # elements per positioned read of a tensor nobody streamed


def feed(h: hashlib._Hash | None, t: torch.Tensor) -> None:
    """Add a contiguous tensor's bytes to `h` (when given)."""
    if h is not None and t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))


class StreamDigests:
    """Per-key sha256 of one input's tensors, fed in order as they are streamed."""

    def __init__(self) -> None:
        self._of: dict[str, hashlib._Hash] = {}

    def new(self, key: str) -> hashlib._Hash:
        """A fresh digest for `key` (its bytes must then be fed whole, in order)."""
        h = self._of[key] = hashlib.sha256()
        return h

    def fingerprint(self, reader: CheckpointReader, raw: SliceReader) -> str:
        """The reader's content fingerprint: streamed digests, the other tensors read now."""
        digests = {}
        for k in reader.keys():
            meta = reader.meta(k)
            h = self._of.get(k)
            if h is None:
                h = hashlib.sha256()
                for lo in range(0, meta.numel, STEP):
                    feed(h, raw.read(k, lo, min(meta.numel, lo + STEP)))
            digests[k] = (meta.dtype, tuple(meta.shape), h.hexdigest())
        return content_fingerprint(digests)
