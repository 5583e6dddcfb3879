"""Read a small tensor out of a stored safetensors blob without torch (for `store show`)."""

from __future__ import annotations

import struct
from pathlib import Path

from tvtool.checkpoints.header import read_header
from tvtool.errors import TvtoolError

_CODES = {"F32": ("f", 4), "F64": ("d", 8), "F16": ("e", 2), "BF16": ("H", 2)}


def read_small_tensor(
    path: Path, name: str, max_numel: int = 1 << 20
) -> tuple[list[int], list[float]]:
    """(shape, values flattened in row-major order) of one float tensor."""
    header = read_header(path)  # the one strict parser: offsets and sizes are validated
    entry = header.entries.get(name)
    if entry is None:
        raise TvtoolError(f"{path} has no tensor {name!r}")
    if entry.dtype not in _CODES:
        raise TvtoolError(f"tensor {name!r} has dtype {entry.dtype}; expected a float type")
    numel = entry.numel
    if numel > max_numel:
        raise TvtoolError(f"tensor {name!r} has {numel} elements; too large to show")
    code, _ = _CODES[entry.dtype]
    with open(path, "rb") as f:
        f.seek(entry.begin)
        data = f.read(entry.end - entry.begin)
    values = struct.unpack(f"<{numel}{code}", data)
    if entry.dtype == "BF16":  # the upper half of a float32
        return list(entry.shape), [
            struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in values
        ]
    return list(entry.shape), list(values)


def coefs_by_block(blob: Path, layout: dict) -> list[tuple[str, int, list[float]]]:
    """(block name, groups, one value per vector) from a `coefs` object's [T, G] tensor and
    its layout; a block's groups are averaged."""
    vectors, blocks = layout.get("vectors", []), layout.get("blocks", [])
    shape, values = read_small_tensor(blob, "coefs")
    n_groups = sum(int(b.get("groups", 1)) for b in blocks)
    if shape != [len(vectors), n_groups]:
        raise TvtoolError(
            f"coefs tensor has shape {shape}; its layout needs [{len(vectors)}, {n_groups}]"
        )
    out, col = [], 0
    for b in blocks:
        g = int(b.get("groups", 1))
        rows = [values[t * n_groups + col : t * n_groups + col + g] for t in range(len(vectors))]
        out.append((b["name"], g, [sum(r) / g for r in rows]))
        col += g
    return out
