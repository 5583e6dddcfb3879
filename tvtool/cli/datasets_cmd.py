"""`tvtool datasets ls/show`: the built-in data sets (class names and prompt templates)."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.group import new_app
from tvtool.cli.options import JsonOpt

datasets_app = new_app(
    "datasets", "Built-in data sets of the task-vector papers: class names and prompt templates."
)


def _complete(incomplete: str) -> list[str]:
    from tvtool.datasets.registry import names

    return [n for n in names() if n.startswith(incomplete)]


@datasets_app.command("ls")
def ls_cmd(
    suite: Annotated[
        str | None,
        typer.Option(
            "--suite",
            help="Only one suite: ta8 (task arithmetic), tall14, tall20 (FusionBench), atlas22.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the built-in data sets (name, classes, templates, suites, title).

    Use one in a run with `--data NAME=PATH`: its published class names and templates apply.
    """
    from tvtool.cli.output import Col, emit_json, out, table
    from tvtool.datasets.registry import SUITES, get, names

    rows = [get(n) for n in names(suite)]
    if as_json:
        from tvtool.cli.store_reports import DatasetRow, DatasetsReport

        emit_json(DatasetsReport(suites=SUITES, datasets=[
            DatasetRow(name=d.name, title=d.title,
                       classes=len(d.classnames) if d.classnames else None,
                       templates=len(d.templates), suites=d.suites, variants=sorted(d.variants))
            for d in rows
        ]))
        return
    table(
        ["name", Col("classes", "right"), Col("templates", "right"), "suites", "title"],
        [
            [
                d.name,
                len(d.classnames) if d.classnames else "data",
                len(d.templates),
                ",".join(d.suites) or "-",
                d.title,
            ]
            for d in rows
        ],
        console=out,
    )


@datasets_app.command("show")
def show_cmd(
    name: Annotated[
        str,
        typer.Argument(
            help="A data set name or alias (NAME:VARIANT for a variant, e.g. pets:fusionbench).",
            autocompletion=_complete,
            show_default=False,
        ),
    ],
    classnames: Annotated[
        bool,
        typer.Option("--classnames", help="Print only the class names, one per line."),
    ] = False,
    templates: Annotated[
        bool,
        typer.Option("--templates", help="Print only the templates, one per line."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show one built-in data set: sources, class names and templates.

    `--classnames` / `--templates` print files usable as `--classnames FILE` / `--templates FILE`.
    """
    from tvtool.cli.output import emit_json, emit_line
    from tvtool.datasets.registry import get
    from tvtool.errors import TvtoolError

    d = get(name)
    if classnames and templates:
        raise TvtoolError("give --classnames or --templates, not both")
    if as_json:
        emit_json(d.model_dump(exclude_none=True))
        return
    if classnames:
        if d.classnames is None:
            raise TvtoolError(f"{d.name}: class names come from the data ({d.note})")
        for c in d.classnames:
            emit_line(c)
        return
    if templates:
        for t in d.templates:
            emit_line(t)
        return
    emit_line(f"{d.name}: {d.title}" + (f" (variant {d.variant})" if d.variant else ""))
    emit_line(f"  aliases:   {', '.join(d.aliases) or '-'}")
    emit_line(f"  suites:    {', '.join(d.suites) or '-'}")
    if d.hf:
        emit_line(f"  hub:       {d.hf}")
    if d.variants:
        emit_line(f"  variants:  {', '.join(sorted(d.variants))}")
    for what, src in d.sources.items():
        emit_line(f"  {what + ':':<11} {src or 'from the data'}")
    if d.note:
        emit_line(f"  note:      {d.note}")
    if d.classnames:
        shown = ", ".join(d.classnames[:8]) + (", ..." if len(d.classnames) > 8 else "")
        emit_line(f"  {len(d.classnames)} classes: {shown}")
    emit_line(f"  {len(d.templates)} templates:")
    for t in d.templates:
        emit_line(f"    {t}")


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
