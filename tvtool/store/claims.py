"""Do a manifest's claims agree with its data? (keys, shapes, dtypes, numel). Torch-free.

Used by `store verify` on every stored safetensors object and by `store import` on every
object of a bundle before anything is written, so a forged manifest is never trusted.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tvtool.errors import TvtoolError
from tvtool.store.manifest import Manifest

Entries = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)
MAX_HEADER = 16 << 20


def header_length(first8: bytes, size: int) -> int:
    """N of a safetensors file of `size` bytes from its first 8 bytes (checked, not read)."""
    if len(first8) < 8:
        raise TvtoolError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", first8[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise TvtoolError(f"not a safetensors file (header of {n} bytes)")
    return n


def entries_from_bytes(head: bytes, size: int, where: str) -> Entries:
    """Entries of a safetensors file of `size` bytes whose first 8 + N bytes are `head`,
    through the one strict header parser."""
    n = header_length(head, size)
    try:
        from tvtool.checkpoints.header import parse_header
    except ImportError:  # until the shared strict parser lands
        return _fallback_entries(head[8 : 8 + n], size - 8 - n)
    header = parse_header(head[8 : 8 + n], size, where)
    return {name: (e.dtype, tuple(e.shape)) for name, e in header.entries.items()}


def _fallback_entries(raw: bytes, data_len: int) -> Entries:
    import json

    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise TvtoolError("not a safetensors file (bad header)") from None
    if not isinstance(doc, dict):
        raise TvtoolError("not a safetensors file (header is not an object)")
    out: Entries = {}
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2 and all(
            type(x) is int and x >= 0 for x in [*shape, *offsets]
        )
        if not ints or not isinstance(info.get("dtype"), str) or offsets[1] > data_len:
            raise TvtoolError(f"not a safetensors file (bad entry {name!r})")
        out[name] = (info["dtype"], tuple(shape))
    return out


def entries_from_file(path: Path) -> Entries:
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        n = header_length(first, size)
        return entries_from_bytes(first + f.read(n), size, str(path))


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
