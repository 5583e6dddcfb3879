"""Option aliases shared by the commands that run data through the model to learn or score
coefficients (`compose`, `select`): declared once so both spell and check them the same way.
Importing this module does not import torch."""

from __future__ import annotations

from typing import Annotated, get_args

import typer

from tvtool.errors import TvtoolError
from tvtool.vectors.blocks import Granularity

GRANULARITIES: tuple[str, ...] = get_args(Granularity)


def _granularity(value: str) -> str:
    if value not in GRANULARITIES:
        raise TvtoolError(f"unknown --granularity {value!r}: use {', '.join(GRANULARITIES)}")
    return value


ObjectiveOpt = Annotated[
    str,
    typer.Option(
        "--objective",
        help="ce (few-shot labels), entropy (unlabelled) or pseudo (confident zero-shot labels).",
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
    typer.Option("--threshold", help="pseudo: minimum zero-shot confidence of a pseudo-label."),
]
GranularityOpt = Annotated[
    str,
    typer.Option(
        "--granularity",
        help="Blocks: one per tensor, per layer or per whole vector (task).",
        callback=_granularity,
    ),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", help="Images per forward pass (and data set).", min=1)
]
VecDtypeOpt = Annotated[
    str,
    typer.Option(
        "--vector-dtype",
        help="Dtype of the vectors on the device (auto: fp16 on CUDA, fp32 on CPU), "
        "fp32, fp16 or bf16; select's --budget-mb counts bytes in it.",
    ),
]
