"""The one strict, torch-free parser of safetensors headers and shard indexes.

A safetensors file is `u64 little-endian N`, then N bytes of UTF-8 JSON, then the tensor data.
Every reader in tvtool (checkpoints, store objects, `store show`, provenance) goes through
`read_header`, so the limits below hold everywhere and hostile headers fail in milliseconds with
one line, before any large allocation:

- header at most `MAX_HEADER_BYTES` (checked before it is read), at most `MAX_ENTRIES` tensors;
- the JSON is an object of objects (nesting deeper than that is refused, duplicates too);
- names are non-empty strings of at most `MAX_NAME` characters without control characters or
  lone surrogates; `__metadata__` maps such strings to strings;
- `dtype` is one of the known strings, `shape` a list of at most `MAX_RANK` non-negative ints
  (never `"22"`, floats or booleans) each below `MAX_DIM`, with a product below `MAX_NUMEL`;
- `data_offsets` are two ints whose difference is `numel * itemsize`, and the ranges tile the
  data region exactly (no gaps, no overlaps, nothing past the end of the file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tvtool.errors import TvtoolError, printable

MAX_HEADER_BYTES = 16 << 20  # a 100k-tensor header is ~10 MB; safetensors itself allows 100 MB
MAX_ENTRIES = 100_000
MAX_NAME = 1024
MAX_RANK = 16
MAX_DIM = 1 << 40
MAX_NUMEL = 1 << 44
MAX_INDEX_BYTES = 64 << 20

ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


class HeaderError(TvtoolError):
    """A file that is not a well-formed safetensors file (or shard index)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: dtype string, shape, absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]  # in file order of their data
    metadata: dict[str, str]
    data_start: int  # 8 + N
    file_size: int


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, all 65 of them


def check_name(name: object, what: str = "tensor name") -> str:
    """A name that is safe to store, print and compare; else why not (raises ValueError)."""
    if not isinstance(name, str):
        shown = printable(repr(name)[:60])
        raise ValueError(f"{what} {shown} is not a string ({type(name).__name__})")
    if not name:
        raise ValueError(f"empty {what}")
    if len(name) > MAX_NAME:
        raise ValueError(f"{what} of {len(name)} characters (at most {MAX_NAME})")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {printable(name)} holds a lone surrogate") from None
    if _CONTROL.search(name):
        raise ValueError(f"{what} {printable(name)} holds control characters")
    return name


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {printable(k)}")
        out[k] = v
    return out


def _int(x: object) -> int:
    if type(x) is not int:  # bool is an int subclass; "22" and 2.0 are not ints
        raise ValueError
    return x


def _entry(name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError("needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise ValueError(f"unknown dtype {printable(str(dtype)[:40])}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise ValueError(f"shape must be a list of at most {MAX_RANK} integers")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError("data_offsets must be a list of two integers")
    try:
        dims = tuple(_int(s) for s in shape)
        begin, end = _int(offsets[0]), _int(offsets[1])
    except ValueError:
        raise ValueError("shape and data_offsets must hold integers") from None
    numel = 1
    for s in dims:
        if not 0 <= s <= MAX_DIM:
            raise ValueError(f"dimension {s} out of range")
        numel *= s
    if max(dims, default=0) and numel > MAX_NUMEL:
        raise ValueError(f"{numel} elements is too many")
    if not 0 <= begin <= end:
        raise ValueError("invalid byte range")
    if end - begin != numel * ITEMSIZE[dtype]:
        raise ValueError(f"{end - begin} bytes for a {list(dims)} {dtype} tensor")
    return dtype, dims, begin, end


def parse_header(raw: bytes, file_size: int, where: str | Path) -> Header:
    """Validate the JSON header `raw` of a file of `file_size` bytes (see the module doc)."""

    def bad(why: str) -> HeaderError:
        return HeaderError(f"{printable(str(where))}: not a readable safetensors file ({why})")

    if not raw.lstrip(b" ").startswith(b"{"):
        raise bad("header is not a JSON object")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs)
    except UnicodeDecodeError:
        raise bad("header is not UTF-8") from None
    except RecursionError:
        raise bad("header JSON is nested too deeply") from None
    except ValueError as e:
        raise bad(f"header is not valid JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    if len(doc) > MAX_ENTRIES + 1:
        raise bad(f"{len(doc)} entries (at most {MAX_ENTRIES})")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise bad("__metadata__ must map names to strings")
    try:
        for k, v in meta.items():
            check_name(k, "metadata key")
            if not isinstance(v, str):
                raise ValueError(f"metadata {printable(k)} is not a string")
            v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("metadata value holds a lone surrogate") from None
    except ValueError as e:
        raise bad(str(e)) from None
    data_start = 8 + len(raw)
    spans: list[tuple[int, int, str]] = []
    parsed: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in doc.items():
        try:
            check_name(name)
            parsed[name] = _entry(name, info)
        except ValueError as e:
            raise bad(f"tensor {printable(name)}: {e}") from None
        spans.append((parsed[name][2], parsed[name][3], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise bad(f"tensor {printable(name)}: byte ranges overlap or leave gaps")
        pos = end
    data_len = file_size - data_start
    if pos != data_len:
        what = "truncated" if pos > data_len else "trailing bytes after the last tensor"
        raise bad(f"{what}: data is {data_len} bytes, header describes {pos}")
    entries = {
        name: Entry(parsed[name][0], parsed[name][1], data_start + b, data_start + e)
        for b, e, name in spans
    }
    return Header(entries, dict(meta), data_start, file_size)


def read_header_fd(fd: int, where: str | Path) -> Header:
    """Read and validate the header of the open file `fd` (positioned reads only)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)

    def bad(why: str) -> HeaderError:
        return HeaderError(f"{printable(str(where))}: not a readable safetensors file ({why})")

    if len(head) < 8:
        raise bad("file too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise bad(f"header of {n} bytes (at most {MAX_HEADER_BYTES})")
    if 8 + n > size:
        raise bad("header length exceeds the file: truncated or not safetensors")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:  # pragma: no cover - the file shrank under us
        raise bad("file changed while reading the header")
    return parse_header(raw, size, where)


def read_header(path: str | Path) -> Header:
    """Read and validate the header of the safetensors file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TvtoolError(f"{printable(str(path))}: cannot open ({e.strerror})") from None
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def looks_like_safetensors(path: str | Path) -> bool:
    """Cheap sniff: a plausible header length followed by `{`."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and n < (1 << 32)


def read_index(index: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(tensor name -> shard file, metadata) of a `*.index.json` shard index.

    Shards must lie inside the index's directory: `../x.safetensors`, absolute paths and links
    that resolve elsewhere are refused."""
    index = Path(index)

    def bad(why: str) -> HeaderError:
        return HeaderError(f"{printable(str(index))}: not a valid shard index ({why})")

    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise bad(f"larger than {MAX_INDEX_BYTES} bytes")
        doc = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_pairs)
    except OSError as e:
        raise bad(e.strerror or type(e).__name__) from None
    except UnicodeDecodeError:
        raise bad("not UTF-8") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    except ValueError as e:
        raise bad(str(e).splitlines()[0][:120]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise bad("no weight_map object")
    weight_map = doc["weight_map"]
    if len(weight_map) > MAX_ENTRIES * 10:
        raise bad(f"{len(weight_map)} entries")
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise bad("metadata is not an object")
    folder = index.parent.resolve()
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        try:
            check_name(name)
            if not isinstance(shard, str):
                raise ValueError("shard file name is not a string")
            check_name(shard, "shard file name")
        except ValueError as e:
            raise bad(str(e)) from None
        if shard not in checked:
            target = (index.parent / shard).resolve()
            if Path(shard).is_absolute() or not target.is_relative_to(folder) or target == folder:
                raise bad(f"shard {printable(shard)} is outside the index's directory")
            checked[shard] = index.parent / shard
        out[name] = checked[shard]
    return out, {str(k): v for k, v in meta.items() if isinstance(v, (str, int, float))}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks (torch-free: `store verify` uses it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
