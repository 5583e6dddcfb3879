"""Do a manifest's claims agree with its data? (keys, shapes, dtypes, numel). Torch-free.

Used by `store verify` on every stored safetensors object and by `store import` on every
object of a bundle before anything is written, so a forged manifest is never trusted.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tvtool.checkpoints.header import MAX_HEADER_BYTES, parse_header, read_header
from tvtool.errors import TvtoolError
from tvtool.store.manifest import Manifest

Entries = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)


def header_length(first8: bytes, size: int) -> int:
    """N of a safetensors file of `size` bytes from its first 8 bytes (checked, not read)."""
    if len(first8) < 8:
        raise TvtoolError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", first8[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise TvtoolError(f"not a safetensors file (header of {n} bytes)")
    return n


def entries_from_bytes(head: bytes, size: int, where: str) -> Entries:
    """Entries of a safetensors file of `size` bytes whose first 8 + N bytes are `head`
    (a bundle member being streamed), through the one strict header parser."""
    n = header_length(head, size)
    header = parse_header(head[8 : 8 + n], size, where)
    return {name: (e.dtype, tuple(e.shape)) for name, e in header.entries.items()}


def entries_from_file(path: Path) -> Entries:
    header = read_header(path)
    return {name: (e.dtype, tuple(e.shape)) for name, e in header.entries.items()}


def claim_problems(manifest: Manifest, entries: Entries) -> list[str]:
    """How the manifest's tensors, numel and dtype disagree with the data's header."""
    out: list[str] = []
    claimed = {t.name: (t.dtype, tuple(t.shape)) for t in manifest.tensors}
    extra = sorted(set(entries) - set(claimed))
    lacking = sorted(set(claimed) - set(entries))
    if extra:
        out.append(f"data has {len(extra)} tensor(s) the manifest does not list ({_few(extra)})")
    if lacking:
        out.append(f"manifest lists {len(lacking)} tensor(s) the data lacks ({_few(lacking)})")
    for name in sorted(set(claimed) & set(entries)):
        (c_dtype, c_shape), (d_dtype, d_shape) = claimed[name], entries[name]
        if c_shape != d_shape:
            out.append(f"tensor {name!r}: manifest says shape {list(c_shape)}, data"
                       f" {list(d_shape)}")
        if c_dtype != d_dtype:
            out.append(f"tensor {name!r}: manifest says dtype {c_dtype}, data {d_dtype}")
    numel = sum(_numel(shape) for _, shape in entries.values())
    if manifest.numel != numel:
        out.append(f"manifest says numel {manifest.numel}, data has {numel}")
    dtypes = ",".join(sorted({dt for dt, _ in entries.values()}))
    if manifest.dtype is not None and entries and manifest.dtype != dtypes:
        out.append(f"manifest says dtype {manifest.dtype}, data has {dtypes}")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
