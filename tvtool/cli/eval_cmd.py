"""`tvtool eval`: top-1 accuracy of a base, task vectors, coefficients or fine-tuned weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tvtool.cli.model_options import BatchSizeOpt, model_options
from tvtool.cli.options import complete_names, output_options, with_options

if TYPE_CHECKING:
    from tvtool.models.eval_report import EvalReport

HELP = "\n\n".join(
    [
        "Top-1 accuracy per data set, with one zero-shot head per data set from its class names.",
        "Weights (at most one): the base alone; VECTOR[:w]... added to it (base + sum w*tau); "
        "--coefs REF (learned by compose); --weights FILE (a fine-tuned checkpoint's image tower; "
        "without --base the file is the whole model). Only the image tower changes; heads come "
        "from the base's text tower.",
        "Data: --data DIR uses DIR/<split> when it exists (default split: test), "
        "else DIR/<class>/*.png.",
        "--grid 0:1:0.05 picks the task-arithmetic scale on validation data (--val DIR..., else "
        "DIR/val) by mean normalised accuracy (accuracy / fine-tuned accuracy, from "
        "--finetuned-acc FILE or measured with --finetuned FILE...), or by mean accuracy when "
        "neither is given. With --control DIR (negation, e.g. VECTOR:-1): the scale of lowest "
        "mean target accuracy whose control accuracy stays >= 95% of the base's (aTLAS / task "
        "arithmetic's criterion); the control is evaluated last.",
        "--disentanglement V1 V2 reports the weight-disentanglement error xi(a1, a2) of two "
        "vectors on two --data sets (one per vector) over --alphas.",
        "-q prints only the mean accuracy (the mean xi with --disentanglement).",
    ]
)


def register(app: typer.Typer) -> None:
    from tvtool.cli.terms_arg import TermsCommand

    app.command("eval", cls=TermsCommand, help=HELP)(eval_cmd)


@with_options(model_options("test", data=...), after="vectors")
@with_options(output_options(named=False))
def eval_cmd(
    vectors: Annotated[
        list[str] | None,
        typer.Argument(
            help="Task vectors to add, as VECTOR[:WEIGHT] (a leading - negates: -mnist:0.5).",
            autocompletion=complete_names,
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="Fine-tuned checkpoint to evaluate.", show_default=False),
    ] = None,
    coefs: Annotated[
        str | None,
        typer.Option(
            "--coefs",
            help="A coefs object (from compose) to apply.",
            autocompletion=complete_names,
            show_default=False,
        ),
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option(
            "--grid",
            help="Scale grid START:STOP:STEP or a list (e.g. 0:1:0.05).",
            show_default=False,
        ),
    ] = None,
    control: Annotated[
        Path | None,
        typer.Option(
            "--control",
            help="Negation search with --grid: the scale of lowest accuracy on the --data "
            "(targets) keeping this set's validation accuracy >= 95% of the base's.",
            show_default=False,
            file_okay=False,
        ),
    ] = None,
    val: Annotated[
        list[Path] | None,
        typer.Option(
            "--val", help="Validation folder per --data set (default DIR/val).", show_default=False
        ),
    ] = None,
    finetuned_acc: Annotated[
        Path | None,
        typer.Option(
            "--finetuned-acc",
            help='JSON {"dataset": accuracy} or a tvtool eval --json report.',
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    finetuned: Annotated[
        list[Path] | None,
        typer.Option(
            "--finetuned",
            help="Fine-tuned checkpoint per --data set, to measure.",
            show_default=False,
        ),
    ] = None,
    disentanglement: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--disentanglement",
            help="Two vectors V1 V2: weight-disentanglement error.",
            show_default=False,
        ),
    ] = None,
    alphas: Annotated[
        str, typer.Option("--alphas", help="Alphas for --disentanglement.")
    ] = "0:1:0.25",
    batch_size: BatchSizeOpt = 128,
    **shared: Any,
) -> None:
    flags = {**locals(), **shared}  # the flags, before any name of the body
    from tvtool.cli.model_options import model_spec
    from tvtool.cli.output import emit, info, progress
    from tvtool.models.eval_run import EvalRequest, run_eval

    req = EvalRequest.from_flags(flags, model=model_spec(flags), heads=list(flags["head"] or []))
    with progress() as bar:

        def on_progress(desc: str, total: int):
            task = bar.add_task(desc, total=total)
            return lambda: bar.advance(task)

        report = run_eval(req, on_note=info, on_progress=on_progress)
    emit(report, json_out=flags["json_out"], quiet=flags["quiet"], human=render,
         quiet_data=[f"{report.headline():.6f}"])


def render(report: EvalReport) -> None:
    """People's view on stderr: the accuracy table, the scale grid, the xi matrix."""
    from tvtool.cli.output import Col, info, short, table

    w = report.weights
    what = {
        "base": "base",
        "weights": f"weights {w.file or ''}",
        "coefs": f"coefs {short(w.coefs)}",
    }.get(w.mode, w.mode)
    if w.mode == "vectors":
        terms = " + ".join(
            f"{v.weight:g}*{v.name}" if v.weight != 1 else v.name for v in w.vectors or []
        )
        scale = report.scale
        what = f"base + {terms}" if scale == 1.0 else f"base + {scale:g} x ({terms})"
    info(f"{report.model} ({what}) on {report.device}")
    if report.grid:
        g = report.grid
        rows = [
            [
                f"{r.scale:g}{' *' if r.scale == g.best_scale else ''}",
                f"{r.mean_accuracy:.2%}",
                f"{r.mean_normalised:.4f}" if r.mean_normalised is not None else "-",
            ]
            for r in g.rows
        ]
        table(
            [Col("scale", "right"), Col("mean acc", "right"), Col("mean norm", "right")],
            rows,
            title="scale grid (validation)",
            caption=f"* best by {g.criterion.replace('_', ' ')}",
        )
    if report.disentanglement:
        d = report.disentanglement
        v1, v2 = d.vectors
        table(
            [Col(f"a1 ({v1}) \\ a2 ({v2})"), *(Col(f"{a:g}", "right") for a in d.alphas)],
            ([f"{a:g}", *(f"{x:.3f}" for x in row)]
             for a, row in zip(d.alphas, d.xi, strict=True)),
            title="disentanglement error xi",
        )
    rows = [
        [r.dataset, str(r.n), f"{r.accuracy:.2%}",
         f"{r.normalised:.3f}" if r.normalised is not None else "-"]
        for r in report.results
    ]
    if len(report.results) > 1:
        mn = report.mean_normalised
        rows.append(
            ["mean", "", f"{report.mean_accuracy:.2%}", f"{mn:.3f}" if mn is not None else "-"]
        )
    table(
        [Col("data set"), Col("images", "right"), Col("accuracy", "right"),
         Col("normalised", "right")],
        rows,
        title=f"top-1 accuracy ({report.split})",
    )
