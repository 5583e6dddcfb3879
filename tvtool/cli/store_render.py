"""How `tvtool store ls` and `store show` render objects for people (stderr/terminal)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tvtool.errors import TvtoolError


def when(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def count(n: int | None) -> str:
    """87849216 -> '87.8M' (exact counts are in --json)."""
    if not n:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def short_dtype(dtype: str | None) -> str:
    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
             "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}
    return ",".join(names.get(d, d) for d in dtype.split(",")) if dtype else ""


def render_manifest(st: Any, m: Any, names: list[str]) -> None:
    import json

    from rich.table import Table

    from tvtool.cli.output import err, human_bytes, plain

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("names", ", ".join(names) or "(untagged)"), ("digest", m.digest), ("kind", m.kind),
        ("format", m.format), ("size", f"{human_bytes(m.size)} ({m.size:,} bytes)"),
        ("numel", f"{m.numel:,}"), ("dtype", m.dtype or ""),
        ("created", when(m.created)), ("tool", f"tvtool {m.tool_version}"),
        ("schema", str(m.schema_version)),
    ]
    for d in m.inputs:
        rows.append(("input", f"{d[:12]} {st.display_name(d) if st.has(d) else '(not in store)'}"))
    if m.tensors:
        shown = ", ".join(f"{t.name} {t.shape}" for t in m.tensors[:6])
        more = f" ... and {len(m.tensors) - 6} more" if len(m.tensors) > 6 else ""
        rows.append(("tensors", f"{len(m.tensors)}: {shown}{more}"))
    for k, v in m.params.items():
        text = json.dumps(v, sort_keys=True)
        rows.append((f"params.{k}", text if len(text) <= 120 else text[:117] + "..."))
    for k, v in rows:
        grid.add_row(k, plain(v))
    err.print(grid)
    if m.kind == "coefs" and m.format == "safetensors":
        render_coefs(st, m)


def render_coefs(st: Any, m: Any, max_rows: int = 40) -> None:
    """Coefficients per block (rows) and vector (columns); groups of a block are averaged."""
    from rich.table import Table

    from tvtool.cli.output import err, plain, warn
    from tvtool.store.peek import coefs_by_block

    vectors = (m.params.get("layout") or {}).get("vectors", [])
    try:
        blocks = coefs_by_block(st.blob_path(m.digest), m.params.get("layout") or {})
    except (TvtoolError, KeyError, TypeError, ValueError) as e:
        warn(f"cannot show coefficients: {e}")
        return
    table = Table(title="coefficients (block x vector)", title_justify="left", box=None)
    table.add_column("block")
    for d in vectors:
        table.add_column(plain(st.display_name(d) if st.has(d) else d[:12]), justify="right")
    for name, groups, cells in blocks[:max_rows]:
        label = name + (f" (mean of {groups})" if groups > 1 else "")
        table.add_row(plain(label), *(f"{c:.4f}" for c in cells))
    err.print(table)
    if len(blocks) > max_rows:
        err.print(f"... {len(blocks) - max_rows} more blocks (see --json / the coefs tensor)")
