"""`tvtool inspect VECTOR...`: norms per block, pairwise cosine, sign agreement, coefficients."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvtool.cli.options import ForceOpt, JsonOpt, StoreOpt, complete_names, open_store

VectorsOptArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Task vectors: ref names, digests or unique digest prefixes "
        "(optional with --coefs: then the vectors it refers to).",
        autocompletion=complete_names,
        show_default=False,
        metavar="VECTOR...",
    ),
]
PerBlockOpt = Annotated[
    bool, typer.Option("--per-block", help="Also show the cosine of every pair per block (tensor).")
]
TopOpt = Annotated[
    int, typer.Option("--top", min=0, help="Rows per table, largest blocks first (0: all).")
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot", metavar="FILE.png", dir_okay=False, show_default=False,
        help="Write a heatmap of the cosine matrix and per-layer norms (.png/.svg/.pdf; "
        "needs matplotlib, the 'plot' extra).",
    ),
]
CoefsOpt = Annotated[
    str | None,
    typer.Option(
        "--coefs", metavar="REF", show_default=False, autocompletion=complete_names,
        help="A coefs object (from compose): per block, each vector's coefficient and which "
        "vector contributes most.",
    ),
]


def inspect(
    vectors: VectorsOptArg = None,
    json_out: JsonOpt = False,
    per_block: PerBlockOpt = False,
    top: TopOpt = 10,
    plot: PlotOpt = None,
    coefs: CoefsOpt = None,
    force: ForceOpt = False,
    store: StoreOpt = None,
) -> None:
    """Statistics of task vectors: per block numel, L2, RMS, max |x|, zeros; pairwise cosine.

    Reads one tensor name at a time from every vector (never whole vectors).
    --json prints everything (all blocks); the tables show the --top largest blocks.
    """
    from tvtool.cli.output import emit_json, progress
    from tvtool.errors import TvtoolError
    from tvtool.vectors.stats import inspect_store

    if not vectors and coefs is None:
        raise TvtoolError("give at least one vector to inspect (or --coefs REF)")
    if plot is not None and plot.exists() and not force:
        raise TvtoolError(f"{plot} exists; use --force to overwrite it")
    st = open_store(store)
    with progress() as bar:
        task = bar.add_task("inspecting", total=None)
        report = inspect_store(
            st, list(vectors or []), per_block=per_block, coefs_ref=coefs,
            on_start=lambda n: bar.update(task, total=n),
            on_key=lambda k: bar.advance(task),
        )
    if plot is not None:
        from tvtool.vectors.plot import write_plot

        write_plot(report, plot, force=force)
    if json_out:
        emit_json(report.model_dump(mode="json", exclude_none=False))
    else:
        render(report, top=top)
    if plot is not None:
        from tvtool.cli.output import info

        info(f"wrote {plot}")


def _fmt(x: float | None, spec: str = ".4g") -> str:
    import math

    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _matrix_table(title: str, m) -> object:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column(title, overflow="fold")
    for n in m.names:
        table.add_column(n, justify="right")
    for n, row in zip(m.names, m.matrix, strict=True):
        table.add_row(n, *(_fmt(c, ".3f") for c in row))
    return table


def render(report, top: int = 10) -> None:
    """Rich tables on stderr: each vector's largest blocks, then the pairwise matrices."""
    from rich.table import Table

    from tvtool.cli.output import err

    limit = top or None
    for v in report.vectors:
        err.print(
            f"[bold]{v.name}[/bold] ({v.digest[:12]})  {v.numel:,} params in {len(v.blocks)} "
            f"blocks  l2 {_fmt(v.l2)}  rms {_fmt(v.rms)}  max|x| {_fmt(v.max_abs)}  "
            f"zeros {v.frac_zero:.2%}",
            soft_wrap=True,
        )
        blocks = sorted(v.blocks, key=lambda b: (-b.numel, b.name))
        table = Table(box=None, pad_edge=False)
        table.add_column("block", overflow="fold")
        for col in ("numel", "l2", "rms", "max|x|", "zeros"):
            table.add_column(col, justify="right", no_wrap=True)
        for b in blocks[:limit]:
            table.add_row(b.name, f"{b.numel:,}", _fmt(b.l2), _fmt(b.rms), _fmt(b.max_abs),
                          f"{b.frac_zero:.1%}")
        err.print(table)
        if limit and len(blocks) > limit:
            err.print(f"  ... {len(blocks) - limit} more blocks (--top 0 shows all, --json "
                      "prints everything)")
        err.print()
    if len(report.vectors) > 1:
        err.print("[bold]cosine similarity[/bold]")
        err.print(_matrix_table("", report.cosine))
        err.print()
        err.print("[bold]sign agreement[/bold] (same sign, among entries where both are nonzero)")
        err.print(_matrix_table("", report.sign_agreement))
        err.print()
    if report.per_block_cosine is not None and report.per_block_cosine.pairs:
        _per_block(report, limit)
    if report.coefs is not None:
        _coefs(report.coefs, limit)


def _per_block(report, limit: int | None) -> None:
    from rich.table import Table

    from tvtool.cli.output import err

    pb = report.per_block_cosine
    numel = {b.name: b.numel for v in report.vectors for b in v.blocks}
    rows = sorted(pb.blocks, key=lambda b: (-numel.get(b.name, 0), b.name))
    err.print("[bold]cosine per block[/bold]")
    table = Table(box=None, pad_edge=False)
    table.add_column("block", overflow="fold")
    for a, b in pb.pairs:
        table.add_column(f"{a} ~ {b}", justify="right")
    for row in rows[:limit]:
        table.add_row(row.name, *(_fmt(c, ".3f") for c in row.cosine))
    err.print(table)
    err.print()


def _coefs(c, limit: int | None) -> None:
    from rich.table import Table

    from tvtool.cli.output import err

    err.print(f"[bold]coefficients {c.name}[/bold] ({c.digest[:12]})  granularity "
              f"{c.granularity}, {len(c.blocks)} blocks" +
              (f", {c.partitions} partitions" if c.partitions > 1 else ""), soft_wrap=True)
    rows = sorted(c.blocks, key=lambda b: -sum(b.contribution))
    table = Table(box=None, pad_edge=False)
    table.add_column("block", overflow="fold")
    for n in c.vectors:
        table.add_column(n, justify="right")
    table.add_column("contributes most", justify="left")
    for b in rows[:limit]:
        cells = [_fmt(m, ".3f") if g == 1 else f"{m:.3f} [{lo:.2f},{hi:.2f}]"
                 for m, lo, hi, g in zip(b.coef, b.coef_min, b.coef_max,
                                         [b.groups] * len(b.coef), strict=True)]
        table.add_row(b.name, *cells, f"{b.top} ({b.top_share:.0%})")
    err.print(table)
    if limit and len(rows) > limit:
        err.print(f"  ... {len(rows) - limit} more blocks (--top 0 shows all)")
    counts = ", ".join(f"{n}: {k}" for n, k in sorted(c.top_counts.items(), key=lambda x: -x[1]))
    err.print(f"blocks where each vector contributes most: {counts}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
