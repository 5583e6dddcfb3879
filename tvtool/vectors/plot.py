"""`inspect --plot`: a heatmap of the cosine matrix beside the per-layer L2 norms of each vector.

matplotlib is an optional extra (`pip install 'tvtool[plot]'`); it is imported only here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from tvtool.errors import TvtoolError
from tvtool.vectors.blocks import layer_of
from tvtool.vectors.stats import InspectReport

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def _natural(s: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def layer_norms(report: InspectReport) -> tuple[list[str], list[list[float]]]:
    """Layers in natural order (resblocks.2 before resblocks.10) and each vector's L2 per layer
    (0 where a vector has no tensor of that layer)."""
    per_vector: list[dict[str, float]] = []
    for v in report.vectors:
        sq: dict[str, float] = {}
        for b in v.blocks:
            layer = layer_of(b.name)
            sq[layer] = sq.get(layer, 0.0) + (b.l2 ** 2 if math.isfinite(b.l2) else 0.0)
        per_vector.append(sq)
    layers = sorted({k for d in per_vector for k in d}, key=_natural)
    return layers, [[math.sqrt(d.get(k, 0.0)) for k in layers] for d in per_vector]


def write_plot(report: InspectReport, path: Path, *, force: bool = False) -> Path:
    """Render the report to `path` (.png, .svg or .pdf), atomically."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TvtoolError(
            "--plot needs matplotlib: install it with pip install 'tvtool[plot]'"
        ) from None
    from tvtool.checkpoints.writer import atomic_output

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TvtoolError(f"--plot {path}: use a .png, .svg or .pdf file name")
    names = report.cosine.names
    t = len(names)
    layers, norms = layer_norms(report)
    fig = Figure(figsize=(6 + min(t, 12) * 0.5 + 6, 5.5), layout="constrained")
    ax_cos, ax_norm = fig.subplots(1, 2, width_ratios=[1, 1.4])

    m = [[float("nan") if c is None else c for c in row] for row in report.cosine.matrix]
    im = ax_cos.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    ax_cos.set_xticks(range(t), [_short(n) for n in names], rotation=45, ha="right")
    ax_cos.set_yticks(range(t), [_short(n) for n in names])
    ax_cos.set_title("cosine similarity")
    if t <= 12:
        for i in range(t):
            for j in range(t):
                if not math.isnan(m[i][j]):
                    ax_cos.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if abs(m[i][j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax_cos, shrink=0.8)

    xs = list(range(len(layers)))
    for name, row in zip(names, norms, strict=True):
        ax_norm.plot(xs, row, marker="o", markersize=3, label=_short(name))
    step = max(1, len(layers) // 30)
    ax_norm.set_xticks(xs[::step], [_label(layer, layers) for layer in layers[::step]],
                       rotation=60, ha="right", fontsize=7)
    ax_norm.set_ylabel("L2 norm")
    ax_norm.set_title("per-layer L2 norm")
    if t <= 12:
        ax_norm.legend(fontsize=8)
    with atomic_output(path, force=force) as f:
        fig.savefig(f, format=fmt, dpi=110)
    return path


def _label(layer: str, layers: list[str]) -> str:
    """A layer name without the dotted prefix all layers share, at most its last two parts."""
    parts = [x.split(".") for x in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    rest = layer.split(".")[common:]
    return ".".join(rest if len(".".join(rest)) <= 24 else rest[-2:])


def _short(s: str, n: int = 20) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]
