"""`tvtool select`: which task vectors matter in which blocks (torch imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from tvtool.cli.learn_options import BatchOpt, learn_fields, learn_options
from tvtool.cli.model_options import model_options
from tvtool.cli.options import VectorsArg, output_options, with_options
from tvtool.compose.registry import SCORES

if TYPE_CHECKING:
    from tvtool.compose.reports import MasksReport, SelectionReport, SelectReport

ScoreOpt = Annotated[
    str,
    typer.Option(
        "--score",
        help="; ".join(f"{s.name}: {s.summary}" for s in SCORES.values()) + ".",
    ),
]
TopOpt = Annotated[
    int | None,
    typer.Option(
        "--top", help="Keep the N best vectors of every block.", min=1, show_default=False
    ),
]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--budget-mb",
        help="Keep the best pairs whose device bytes fit M megabytes.",
        show_default=False,
    ),
]
DensityOpt = Annotated[
    float | None,
    typer.Option(
        "--density",
        help="Fraction of each vector's elements a mask keeps (importance default 0.2).",
        show_default=False,
    ),
]


def _layer_rows(blocks: list[str]) -> dict[str, list[int]]:
    from tvtool.vectors.blocks import layer_of

    rows: dict[str, list[int]] = {}
    for b, name in enumerate(blocks):
        rows.setdefault(layer_of(name), []).append(b)
    return rows


def render_selection(report: SelectionReport) -> None:
    from tvtool.cli.output import Cell, Col, human_bytes, info, stored, table

    scores, keep = report.scores, set(report.keep)
    top = max((max(r) for r in scores), default=0.0) or 1.0
    rows = []
    for layer, bs in _layer_rows(report.blocks).items():
        cells: list[Any] = [layer]
        for t in range(len(report.vectors)):
            s = sum(scores[t][b] for b in bs) / top
            k = sum((t, b) in keep for b in bs)
            cells.append(Cell(f"{s:.2f} ({k}/{len(bs)})", "bold green" if k else "dim"))
        rows.append(cells)
    table(
        [Col("layer"), *(Col(v.label, "right") for v in report.vectors)],
        rows,
        title=f"select --score {report.score}: share of the top score (kept/blocks)",
    )
    info(
        f"kept {len(keep)} of {sum(1 for r in scores for _ in r)} (vector, block) pairs, "
        f"{human_bytes(report.bytes)} of {human_bytes(report.total_bytes)} on the device"
    )
    stored("selection", report.digest, report.name)


def render_masks(report: MasksReport) -> None:
    from tvtool.cli.output import Col, stored, table

    masks = report.masks
    layers = list(dict.fromkeys(layer for m in masks for layer in m.kept_by_layer))
    table(
        [Col("layer"), *(Col(m.label, "right") for m in masks)],
        (
            [layer, *(f"{100 * m.kept_by_layer[layer]:.1f}%" if layer in m.kept_by_layer
                      else "-" for m in masks)]
            for layer in layers
        ),
        title=f"select --score {report.score}: elements kept per layer "
        f"(density {report.density})",
    )
    for m in masks:
        stored("mask", m.digest, m.name, f" for {m.label}: {m.kept:,} of {m.scored:,} elements")


def render(report: SelectReport) -> None:
    if report.kind == "selection":
        render_selection(report)
    else:
        render_masks(report)


def digests(report: SelectReport) -> list[str]:
    if report.kind == "selection":
        return [report.digest]
    return [m.digest for m in report.masks]


@with_options(model_options("train"), after="vectors")
@with_options(learn_options("fp16"), output_options())
def select_command(
    vectors: VectorsArg,
    score: ScoreOpt = "grad",
    top: TopOpt = None,
    budget_mb: BudgetOpt = None,
    density: DensityOpt = None,
    batch_size: BatchOpt = 32,
    **shared: Any,
) -> None:
    """Score which task VECTORS matter in which blocks for the --data, and keep the best.

    grad (default): s[t, block] = |dL/dLambda| at Lambda = 0 -> a `selection` for
    `compose --selection` (--top N per block, or --budget-mb M). fisher: sum over batches of
    (dL/dLambda)^2; fisher-unit: that / ||tau_block||^2, the Fisher along each vector's unit
    direction (a learned coefficient absorbs tau's scale, so size alone does not win a block).
    gain: per block, the --top N vectors whose coefficients a quadratic (empirical-Fisher) model
    of the loss says help most together. importance: |tau * dL/dtheta|
    per element -> one `mask` per vector for `merge --method mask` (--density d). norm: data-free
    |tau| (selection with --top/--budget-mb, masks with --density; no model needed).
    """
    flags = {**locals(), **shared}  # the flags, before any name of the body
    from tvtool.cli.output import emit, progress, warn
    from tvtool.compose.requests import SelectRequest
    from tvtool.compose.select_run import run_select

    req = SelectRequest.from_flags(flags, **learn_fields(flags))
    with progress() as bar:
        task = bar.add_task("scoring", total=None)
        report = run_select(req, on_batch=lambda: bar.advance(task), warn=warn)
    emit(report, json_out=flags["json_out"], quiet=flags["quiet"], human=render,
         data=digests(report))


def register(app: typer.Typer) -> None:
    app.command("select")(select_command)
