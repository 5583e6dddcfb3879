"""Positioned reads of flat slices of safetensors tensors: what `merge` streams.

A slice [start, stop) of a tensor (flattened row-major) is read with `os.preadv` straight into
a caller's buffer, or into the reader's own reused one, so no page of a mapped file and no
fresh tensor is touched per slice (the merge's inputs stay in CPU cache slice by slice).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tvtool.checkpoints.readers import CheckpointReader, SafetensorsReader, normalise_keys
from tvtool.checkpoints.safetensors_file import SafetensorsFile
from tvtool.errors import TvtoolError

CHUNK = 1 << 18  # elements per slice: 1 MB of float32


class SliceReader:
    """Positioned reads of flat slices of the tensors of a safetensors checkpoint."""

    def __init__(self, files: list[Path], names: dict[str, str] | None = None):
        self._files = [SafetensorsFile(f) for f in files]
        self._fds = [os.open(sf.path, os.O_RDONLY) for sf in self._files]
        where = {raw: i for i, sf in enumerate(self._files) for raw in sf.entries}
        raw_names = names if names is not None else {r: r for r in where}
        self._index = {k: (where[r], r) for k, r in raw_names.items()}
        self._buf = torch.empty(CHUNK * 4, dtype=torch.uint8)
        self._view = memoryview(self._buf.numpy()).cast("B")

    @classmethod
    def of(cls, reader: CheckpointReader, stored: bool) -> SliceReader | None:
        """For a safetensors reader (a store object: `stored`, names kept as written)."""
        if not isinstance(reader, SafetensorsReader):
            return None
        out = cls(list(reader.files))
        if not stored:
            out._index = {k: out._index[r] for k, r in normalise_keys(sorted(out._index)).items()}
        if set(out._index) != set(reader.keys()):  # pragma: no cover - same naming rules
            out.close()
            return None
        return out

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def dtype(self, key: str) -> torch.dtype:
        i, raw = self._index[key]
        return self._files[i].dtype(raw)

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of tensor `key`, flattened row-major, as a 1-D tensor that
        lives in this reader's buffer (grown as needed): valid until its next `read`."""
        i, raw = self._index[key]
        dtype = self._files[i].dtype(raw)
        nbytes = (stop - start) * torch.empty((), dtype=dtype).element_size()
        if nbytes > self._buf.numel():
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
            self._view = memoryview(self._buf.numpy()).cast("B")
        self._pread(key, start, self._view[:nbytes])
        return self._buf[:nbytes].view(dtype)

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """`read` into `out` (a contiguous 1-D tensor of stop - start elements): the bytes go
        straight there when the dtypes agree, else through this reader's buffer."""
        i, raw = self._index[key]
        if self._files[i].dtype(raw) != out.dtype or not out.is_contiguous():
            return out.copy_(self.read(key, start, stop))
        if out.numel():
            self._pread(key, start, memoryview(out.view(torch.uint8).numpy()).cast("B"))
        return out

    def _pread(self, key: str, start: int, view: memoryview) -> None:
        i, raw = self._index[key]
        sf = self._files[i]
        item = torch.empty((), dtype=sf.dtype(raw)).element_size()
        offset = sf.entries[raw].begin + start * item
        done, nbytes = 0, len(view)
        while done < nbytes:
            got = os.preadv(self._fds[i], [view[done:]], offset + done)
            if got <= 0:
                raise TvtoolError(f"{sf.path}: unexpected end of file reading tensor {key!r}")
            done += got

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        for sf in self._files:
            sf.close()
        self._fds, self._files = [], []

