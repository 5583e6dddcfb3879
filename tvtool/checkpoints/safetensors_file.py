"""One safetensors file read with plain `pread`s: a validated header, then one tensor at a time.

Not memory-mapped on purpose: pages of a mapped file that have been touched stay in the
process's resident set until it is unmapped, so streaming two mapped checkpoints would show the
footprint of two models. Reading each tensor into its own buffer keeps the peak at the tensors
actually alive.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tvtool.errors import TvtoolError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """A validated safetensors header plus positioned reads of its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise TvtoolError(f"{path}: cannot open ({e.strerror})") from None
        try:
            self.entries, self.metadata = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _bad(self, why: str) -> TvtoolError:
        return TvtoolError(f"{self.path}: not a readable safetensors file ({why})")

    def _parse(self) -> tuple[dict[str, Entry], dict[str, str]]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._bad("file too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise self._bad("header length exceeds the file: truncated or not safetensors")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except ValueError:
            raise self._bad("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("__metadata__ must map names to strings")
        data_start, data_len = 8 + n, size - 8 - n
        entries: dict[str, Entry] = {}
        spans = []
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"malformed entry for tensor {name!r}") from None
            numel = 1
            for s in shape:
                if s < 0:
                    raise self._bad(f"negative dimension in tensor {name!r}")
                numel *= s
            item = _ITEMSIZE.get(dtype)
            if item is not None and end - begin != numel * item:
                raise self._bad(f"tensor {name!r}: byte range does not match its shape")
            if not 0 <= begin <= end:
                raise self._bad(f"tensor {name!r}: invalid byte range")
            spans.append((begin, end, name))
            entries[name] = Entry(dtype, shape, data_start + begin, data_start + end)
        pos = 0
        for begin, end, name in sorted(spans):
            if begin != pos:
                raise self._bad(f"tensor {name!r}: byte ranges overlap or leave gaps")
            pos = end
        if pos != data_len:
            what = "truncated" if pos > data_len else "trailing bytes after the last tensor"
            raise self._bad(f"{what}: data is {data_len} bytes, header describes {pos}")
        return entries, {str(k): v for k, v in meta.items()}

    def dtype(self, name: str) -> torch.dtype:
        e = self.entries[name]
        dt = ST_DTYPES.get(e.dtype)
        if dt is None:
            raise TvtoolError(f"{self.path}: tensor {name!r} has unsupported dtype {e.dtype}")
        return dt

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor (owning its memory) with the contents of `name`."""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=self.dtype(name))
        nbytes = e.end - e.begin
        if nbytes == 0:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [buf[done:]], e.begin + done)
            if got <= 0:
                raise TvtoolError(f"{self.path}: unexpected end of file reading tensor {name!r}")
            done += got
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
