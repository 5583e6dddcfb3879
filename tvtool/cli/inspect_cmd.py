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
    int,
    typer.Option("--top", min=0, help="Rows per table, largest blocks (by L2) first (0: all)."),
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
    from tvtool.cli.output import emit, progress
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
    emit(
        report.model_dump(mode="json", exclude_none=False) if json_out else report,
        json_out=json_out,
        human=lambda r: render(r, top=top),
    )
    if plot is not None:
        from tvtool.cli.output import info

        info(f"wrote {plot}")


def _fmt(x: float | None, spec: str = ".4g") -> str:
    import math

    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _by_l2(l2: float | None) -> float:
    """Sort key: largest L2 first, NaN/None last."""
    import math

    return -l2 if l2 is not None and math.isfinite(l2) else math.inf


def _matrix(m) -> None:
    from tvtool.cli.output import Col, table

    table([Col(""), *(Col(n, "right") for n in m.names)],
          ([n, *(_fmt(c, ".3f") for c in row)] for n, row in zip(m.names, m.matrix, strict=True)))


def _more(limit: int | None, n: int, hint: str) -> None:
    from tvtool.cli.output import info

    if limit and n > limit:
        info(f"  ... {n - limit} more blocks ({hint})")


def render(report, top: int = 10) -> None:
    """Tables on stderr: each vector's largest blocks by L2, then the pairwise matrices."""
    from tvtool.cli.output import Col, err, info, plain, short, table

    limit = top or None
    for v in report.vectors:
        err.print(
            f"[bold]{plain(v.name)}[/bold] ({short(v.digest)})  {v.numel:,} params in "
            f"{len(v.blocks)} blocks  l2 {_fmt(v.l2)}  rms {_fmt(v.rms)}  max|x| "
            f"{_fmt(v.max_abs)}  zeros {v.frac_zero:.2%}",
            soft_wrap=True,
        )
        blocks = sorted(v.blocks, key=lambda b: (_by_l2(b.l2), b.name))
        cols = [Col("block"), *(Col(c, "right") for c in ("numel", "l2", "rms", "max|x|", "zeros"))]
        table(cols, ([b.name, f"{b.numel:,}", _fmt(b.l2), _fmt(b.rms), _fmt(b.max_abs),
                      f"{b.frac_zero:.1%}"] for b in blocks[:limit]))
        _more(limit, len(blocks), "--top 0 shows all, --json prints everything")
        info("")
    if len(report.vectors) > 1:
        err.print("[bold]cosine similarity[/bold]")
        _matrix(report.cosine)
        info("")
        err.print("[bold]sign agreement[/bold] (same sign, among entries where both are nonzero)")
        _matrix(report.sign_agreement)
        info("")
    if report.per_block_cosine is not None and report.per_block_cosine.pairs:
        _per_block(report, limit)
    if report.coefs is not None:
        _coefs(report.coefs, limit)


def _per_block(report, limit: int | None) -> None:
    from tvtool.cli.output import Col, err, info, table

    pb = report.per_block_cosine
    l2: dict[str, float] = {}
    for v in report.vectors:
        for b in v.blocks:
            l2[b.name] = min(l2.get(b.name, float("inf")), _by_l2(b.l2))
    rows = sorted(pb.blocks, key=lambda b: (l2.get(b.name, float("inf")), b.name))
    err.print("[bold]cosine per block[/bold] (largest L2 first)")
    table([Col("block"), *(Col(f"{a} ~ {b}", "right") for a, b in pb.pairs)],
          ([row.name, *(_fmt(c, ".3f") for c in row.cosine)] for row in rows[:limit]))
    _more(limit, len(rows), "--top 0 shows all")
    info("")


def _coefs(c, limit: int | None) -> None:
    from tvtool.cli.output import Col, err, info, plain, short, table

    err.print(f"[bold]coefficients {plain(c.name)}[/bold] ({short(c.digest)})  granularity "
              f"{c.granularity}, {len(c.blocks)} blocks" +
              (f", {c.partitions} partitions" if c.partitions > 1 else ""), soft_wrap=True)
    rows = sorted(c.blocks, key=lambda b: -sum(b.contribution))
    cols = [Col("block"), *(Col(n, "right") for n in c.vectors), Col("contributes most")]
    table(cols, ([b.name, *(_fmt(m, ".3f") if b.groups == 1 else f"{m:.3f} [{lo:.2f},{hi:.2f}]"
                            for m, lo, hi in zip(b.coef, b.coef_min, b.coef_max, strict=True)),
                  f"{b.top} ({b.top_share:.0%})"] for b in rows[:limit]))
    _more(limit, len(rows), "--top 0 shows all")
    counts = ", ".join(f"{n}: {k}" for n, k in sorted(c.top_counts.items(), key=lambda x: -x[1]))
    info(f"blocks where each vector contributes most: {counts}")


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
