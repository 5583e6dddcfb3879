"""`tvtool demo`: the whole pipeline on the offline example zoo; `tvtool demo build`: the zoo alone.

Importing this module does not import torch (the work happens inside the command bodies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvtool.cli.group import TvtoolGroup
from tvtool.cli.options import DeviceOpt, JsonOpt

DEFAULT_OUT = Path("tvtool-demo")

OutOpt = Annotated[
    Path,
    typer.Option("--out", "-o", help="Demo directory (zoo, store, reports).", file_okay=False),
]
BuildOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Zoo directory [default: tvtool-demo/zoo].",
        file_okay=False,
        show_default=False,
    ),
]
DemoSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the zoo and of every stage.")]
DemoForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Rebuild a zoo made with another recipe; accept a non-empty --out."
    ),
]
SmallOpt = Annotated[
    bool,
    typer.Option("--small", help="The reduced zoo (3 task domains, 2 held out; about a minute)."),
]

demo_app = typer.Typer(
    cls=TvtoolGroup,
    name="demo",
    invoke_without_command=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@demo_app.callback()
def demo(
    ctx: typer.Context,
    out: OutOpt = DEFAULT_OUT,
    seed: DemoSeedOpt = 0,
    small: SmallOpt = False,
    json_out: JsonOpt = False,
    force: DemoForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Run tvtool end to end on an offline example zoo built from scikit-learn's digits.

    Builds (or reuses) the zoo in OUT/zoo, then runs the real commands in a fresh OUT/store:

    extract, inspect, eval, compose (addition, negation, 16 shots, entropy), select, merge.

    Attention-only task vectors (digits-attn/<domain>) vs full ones: eval --disentanglement
    and task addition (eval --grid).

    Prints one results table, writes OUT/report.md and OUT/results.json, checks 6 claims.

    Needs the demo extra (scikit-learn, pillow; matplotlib for the cosine heatmap).
    """
    if ctx.invoked_subcommand is not None:
        return
    from tvtool.cli.output import emit_json
    from tvtool.demo.pipeline import run_demo
    from tvtool.demo.progress import stage_progress
    from tvtool.demo.report import render_table

    with stage_progress() as progress:
        result = run_demo(
            out,
            seed=seed,
            size="small" if small else "full",
            force=force,
            device=device,
            progress=progress,
        )
    render_table(result)
    if json_out:
        emit_json(result)


@demo_app.command("build")
def build(
    out: BuildOutOpt = None,
    seed: DemoSeedOpt = 0,
    small: SmallOpt = False,
    json_out: JsonOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild a zoo that another recipe (seed, size) made.")
    ] = False,
) -> None:
    """Build the example zoo alone (cached: a second run reuses what exists).

    Image folders: OUT/data/<domain>/<split>/<class>/*.png

    A tiny CLIP pre-trained on two domains: OUT/models/zeroshot.safetensors (+ config JSON)

    One fine-tuned checkpoint per task domain: OUT/models/<domain>/finetuned.safetensors

    One attention-only fine-tune per task domain (only in_proj / out_proj of the image tower
    trained): OUT/models/<domain>/attention.safetensors
    """
    from tvtool.cli.output import emit_json, info
    from tvtool.demo.progress import stage_progress
    from tvtool.demo.zoo import build_zoo

    target = out if out is not None else DEFAULT_OUT / "zoo"
    with stage_progress() as progress:
        zoo = build_zoo(target, seed, "small" if small else "full", force=force, progress=progress)
    if json_out:
        emit_json({"root": str(zoo.root), "reused": zoo.reused, **zoo.info.model_dump(mode="json")})
        return
    acc = zoo.info.accuracy
    for d in zoo.recipe.task_domains:
        a = acc[d]
        info(
            f"{d:>12}: zero-shot {a['zeroshot']:5.1f}%  fine-tuned {a['finetuned']:5.1f}%  "
            f"attention-only {a.get('attention', float('nan')):5.1f}%"
        )
    for d in zoo.recipe.target_domains:
        info(f"{d:>12}: zero-shot {acc[d]['zeroshot']:5.1f}%  (held out: no task vector)")
    took = sum(zoo.info.seconds.values())
    how = f"reused {', '.join(zoo.reused)}" if zoo.reused else "built from scratch"
    info(f"zoo at {zoo.root} ({how}; {took:.0f} s)")


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")
