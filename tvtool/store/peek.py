"""Read a small tensor out of a stored safetensors blob without torch (for `store show`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tvtool.errors import TvtoolError

_CODES = {"F32": ("f", 4), "F64": ("d", 8), "F16": ("e", 2), "BF16": ("H", 2)}
MAX_HEADER = 100 << 20


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise TvtoolError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise TvtoolError(f"{path} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise TvtoolError(f"{path} is not a safetensors file (bad header)") from None
    return header, 8 + n


def read_small_tensor(
    path: Path, name: str, max_numel: int = 1 << 20
) -> tuple[list[int], list[float]]:
    """(shape, values flattened in row-major order) of one float tensor."""
    header, start = safetensors_header(path)
    info = header.get(name)
    if not isinstance(info, dict):
        raise TvtoolError(f"{path} has no tensor {name!r}")
    dtype, shape = info.get("dtype"), [int(s) for s in info.get("shape", [])]
    if dtype not in _CODES:
        raise TvtoolError(f"tensor {name!r} has dtype {dtype}; expected a float type")
    numel = 1
    for s in shape:
        numel *= s
    if numel > max_numel:
        raise TvtoolError(f"tensor {name!r} has {numel} elements; too large to show")
    code, width = _CODES[dtype]
    begin, end = info["data_offsets"]
    if end - begin != numel * width:
        raise TvtoolError(f"tensor {name!r} has {end - begin} bytes, its shape {numel * width}")
    with open(path, "rb") as f:
        f.seek(start + begin)
        data = f.read(end - begin)
    values = struct.unpack(f"<{numel}{code}", data)
    if dtype == "BF16":  # the upper half of a float32
        return shape, [struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in values]
    return shape, list(values)


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
