"""One safetensors file read with plain `pread`s: a validated header, then one tensor at a time.

Not memory-mapped on purpose: pages of a mapped file that have been touched stay in the
process's resident set until it is unmapped, so streaming two mapped checkpoints would show the
footprint of two models. Reading each tensor into its own buffer keeps the peak at the tensors
actually alive.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tvtool.checkpoints.header import Entry, read_header_fd
from tvtool.errors import TvtoolError, printable

__all__ = ["ST_DTYPES", "Entry", "SafetensorsFile"]

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)


class SafetensorsFile:
    """A validated safetensors header (`tvtool.checkpoints.header`) plus positioned reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise TvtoolError(f"{printable(str(path))}: cannot open ({e.strerror})") from None
        try:
            header = read_header_fd(self._fd, self.path)
        except BaseException:
            os.close(self._fd)
            raise
        self.entries: dict[str, Entry] = header.entries
        self.metadata: dict[str, str] = header.metadata
        self.size = header.file_size

    def dtype(self, name: str) -> torch.dtype:
        e = self.entries[name]
        dt = ST_DTYPES.get(e.dtype)
        if dt is None:
            raise TvtoolError(
                f"{printable(str(self.path))}: tensor {name!r} has unsupported dtype {e.dtype}"
            )
        return dt

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor (owning its memory) with the contents of `name`."""
        out = torch.empty(self.entries[name].shape, dtype=self.dtype(name))
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor | np.ndarray, start: int = 0) -> None:
        """Fill the contiguous `out` (of `name`'s dtype) with its size of elements of `name`
        from element `start` on: positioned reads of just those bytes into its memory."""
        e = self.entries[name]
        arr = out.view(-1).view(torch.uint8).numpy() if isinstance(out, torch.Tensor) else out
        buf = memoryview(arr).cast("B")
        nbytes = len(buf)
        begin = e.begin + start * arr.itemsize
        if start < 0 or begin + nbytes > e.end:
            raise ValueError(f"elements {start}.. of {out.numel()} are outside tensor {name!r}")
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [buf[done:]], begin + done)
            if got <= 0:
                raise TvtoolError(f"{self.path}: unexpected end of file reading tensor {name!r}")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
