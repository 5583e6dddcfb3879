"""Option aliases shared by the commands that run data through the model to learn or score
coefficients (`compose`, `select`): declared once so both spell them the same way; the values are
checked once, by the command's request (`tvtool.compose.requests`). Torch-free."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from tvtool.cli.options import SeedOpt, option

ObjectiveOpt = Annotated[
    str,
    typer.Option(
        "--objective",
        help="ce (few-shot labels), entropy (unlabelled), pseudo (confident zero-shot labels) or "
        "ufm (compose only: aTLAS's online FixMatch, weak-view targets for strong views).",
        metavar="ce|entropy|pseudo|ufm",
    ),
]
ShotsOpt = Annotated[
    int | None,
    typer.Option(
        "--shots",
        "-k",
        help="Images per class, sampled with --seed (default: all).",
        min=1,
        show_default=False,
    ),
]
ThresholdOpt = Annotated[
    float,
    typer.Option(
        "--threshold",
        help="pseudo: minimum zero-shot confidence of a pseudo-label; ufm: of a weak-view target.",
    ),
]
GranularityOpt = Annotated[
    str,
    typer.Option(
        "--granularity",
        help="Blocks: one per tensor, per layer or per whole vector (task).",
        metavar="tensor|layer|task",
    ),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", help="Images per forward pass (and data set).", min=1)
]
VecDtypeOpt = Annotated[
    str,
    typer.Option(
        "--vector-dtype",
        help="Dtype of the vectors on the device: auto (fp16 on CUDA, fp32 on CPU), fp32, "
        "fp16 or bf16.",
    ),
]
BudgetDtypeOpt = Annotated[
    str,
    typer.Option(
        "--vector-dtype",
        help="Dtype --budget-mb counts the vectors' bytes in (the one compose will hold them in "
        "on the device): fp32, fp16 or bf16.",
    ),
]


def learn_options(vector_dtype: str) -> list[inspect.Parameter]:
    """--objective, --shots, --threshold, --granularity, --seed and --vector-dtype (default
    `vector_dtype`: "auto" is compose's device dtype, a fixed one select's budget dtype), as
    compose and select take them."""
    return [
        option("objective", ObjectiveOpt, "ce"),
        option("shots", ShotsOpt),
        option("threshold", ThresholdOpt, 0.99),
        option("granularity", GranularityOpt, "tensor"),
        option("seed", SeedOpt, 0),
        option(
            "vector_dtype", VecDtypeOpt if vector_dtype == "auto" else BudgetDtypeOpt, vector_dtype
        ),
    ]


def learn_fields(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields compose and select build from several flags: the model spec, the head
    files, the --templates file's lines and the objective's parameters."""
    from tvtool.cli.model_options import model_spec
    from tvtool.compose.registry import objective_params
    from tvtool.models.heads import load_templates

    templates = flags["templates"]
    return {
        "model": model_spec(flags),
        "heads": list(flags["head"] or []),
        "templates": load_templates(templates) if templates else None,
        "objective": objective_params(flags["objective"], threshold=flags["threshold"]),
    }
