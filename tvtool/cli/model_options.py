"""Option aliases shared by compose, select and eval (model, weights, data), and the helpers that
turn them into the request's model spec. Importing this module does not import torch."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from tvtool.cli.options import DeviceOpt, option

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="open_clip architecture name (e.g. ViT-B-32).", show_default=False
    ),
]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-config",
        help="Custom open_clip config JSON (model name = file stem); instead of --model.",
        show_default=False,
        dir_okay=False,
    ),
]
BaseOpt = Annotated[
    Path | None,
    typer.Option(
        "--base",
        "-b",
        help="Base (pre-trained) weights: any checkpoint format extract reads.",
        show_default=False,
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip pretrained tag whose weights are cached locally (never downloaded).",
        show_default=False,
    ),
]
DataOpt = Annotated[
    list[Path],
    typer.Option(
        "--data",
        "-d",
        help="Data: image folder DIR/<class>/*.png (or DIR/<split>/<class>/...), Hugging Face "
        "save_to_disk folder or parquet, or CSV of path,label; NAME=PATH uses built-in data set "
        "NAME's class names and templates (`tvtool datasets ls`). Unreadable images and "
        "decompression bombs are skipped with a count. Repeatable.",
        show_default=False,
    ),
]
ClassnamesOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--classnames",
        help="Class names file, one per line in class-index order (one for all or one per --data).",
        show_default=False,
        dir_okay=False,
    ),
]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--templates",
        help="Prompt templates file, one per line with '{}' (default: built-in).",
        show_default=False,
        dir_okay=False,
    ),
]
QuickGeluOpt = Annotated[
    bool | None,
    typer.Option(
        "--quick-gelu/--no-quick-gelu",
        help="Force QuickGELU (OpenAI CLIP weights) or nn.GELU; default: what the checkpoint "
        "says, or the architecture name (-quickgelu).",
        show_default=False,
    ),
]
TextTowerOpt = Annotated[
    str | None,
    typer.Option(
        "--text-tower",
        help="Text tower for the zero-shot heads: a full CLIP checkpoint FILE or a cached "
        "open_clip TAG (for image-tower-only bases).",
        show_default=False,
    ),
]
HeadOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--head",
        help="Zero-shot head file per data set (ClassificationHead pickle or [C, D] tensor), "
        "in the order the data sets are given; instead of the text tower.",
        show_default=False,
        dir_okay=False,
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.", min=1)]
SplitOpt = Annotated[
    str,
    typer.Option(
        "--split", help="Split sub-folder used when DIR/<split> exists (e.g. train, val, test)."
    ),
]


MODEL_FLAGS = {  # flag (parameter name) -> ModelSpec field
    "model": "arch",
    "model_config": "config",
    "base": "base",
    "pretrained": "pretrained",
    "device": "device",
    "quick_gelu": "quick_gelu",
    "text_tower": "text_tower",
}


def model_spec(flags: Mapping[str, Any]) -> Any:
    """--model/--model-config + --base/--pretrained + --device (+ --quick-gelu, --text-tower),
    from a command's flags, -> the request's ModelSpec (torch-free; `spec.load()` builds it)."""
    from tvtool.models.spec import ModelSpec

    return ModelSpec(
        **{f: flags[k] for k, f in MODEL_FLAGS.items() if flags.get(k) is not None}
    )


OtherBaseOpt = Annotated[
    bool,
    typer.Option(
        "--allow-other-base", help="Accept vectors recorded as extracted from another base file."
    ),
]


def model_options(split: str, data: Any = None) -> list[inspect.Parameter]:
    """The model (--model/--model-config, --base/--pretrained, --quick-gelu, --text-tower,
    --head), the data (--data, --classnames, --templates, --split), --allow-other-base and
    --device, as compose, select and eval take them; `split` and `data` are the defaults (eval
    reads the test split and needs --data: ``...``)."""
    return [
        option("model", ModelOpt),
        option("model_config", ModelConfigOpt),
        option("base", BaseOpt),
        option("pretrained", PretrainedOpt),
        option("quick_gelu", QuickGeluOpt),
        option("text_tower", TextTowerOpt),
        option("head", HeadOpt),
        option("data", DataOpt, data),
        option("classnames", ClassnamesOpt),
        option("templates", TemplatesOpt),
        option("split", SplitOpt, split),
        option("allow_other_base", OtherBaseOpt, False),
        option("device", DeviceOpt, "auto"),
    ]
