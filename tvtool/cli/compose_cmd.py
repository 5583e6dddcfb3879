"""`tvtool compose`: learn aTLAS coefficients for a bank of task vectors (torch imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tvtool.cli.learn_options import learn_fields, learn_options
from tvtool.cli.model_options import model_options
from tvtool.cli.options import complete_names, output_options, with_options

if TYPE_CHECKING:
    from tvtool.compose.reports import ComposeReport

OptVectors = Annotated[
    list[str] | None,
    typer.Argument(
        help="Task vectors (names or digests); optional with --selection.",
        autocompletion=complete_names,
        show_default=False,
    ),
]
PartitionsOpt = Annotated[
    int,
    typer.Option(
        "--partitions",
        help="Split each 2-D weight's elements into K seeded random groups (aTLAS xK).",
        min=1,
    ),
]
EpochsOpt = Annotated[
    int | None,
    typer.Option(
        "--epochs",
        help="Passes over the training images (default per run kind, see below).",
        min=1,
        show_default=False,
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Learning rate (default: few-shot 1e-1, addition 1e-3, negation 5e-3, test-time "
        "1e-3; see below).",
        show_default=False,
    ),
]
ComposeBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Images per micro-batch and data set (default: the authors' 128 per step split "
        "over the data sets; 32 per set for entropy).",
        min=1,
        show_default=False,
    ),
]
ScheduleOpt = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        help="Learning-rate schedule: cosine (no warm-up) or constant (default per run kind).",
        show_default=False,
    ),
]
ClipGradOpt = Annotated[
    float | None,
    typer.Option(
        "--clip-grad",
        help="Clip the coefficients' gradient norm per step (default 1.0 as aTLAS; entropy: "
        "none; 0 turns it off).",
        min=0.0,
        show_default=False,
    ),
]
AugmentOpt = Annotated[
    str | None,
    typer.Option(
        "--augment",
        help="Training views: atlas (crop 0.5-1 + flip), clip (open_clip train crop 0.9-1), "
        "none, mild (crop 0.8-1), strong (crop 0.5-1 + colour jitter).",
        show_default=False,
    ),
]
MinStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--min-steps",
        help="Oversample small training sets so an epoch has at least N steps (aTLAS few-shot: "
        "10; 0: never).",
        min=0,
        show_default=False,
    ),
]
InitOpt = Annotated[
    float,
    typer.Option("--init", help="Start every coefficient here (AdaMerging: 0.3; aTLAS: 0)."),
]
ClampOpt = Annotated[
    str | None,
    typer.Option(
        "--clamp",
        help="Clamp the coefficients to LO:HI in every forward pass (AdaMerging: 0:1).",
        show_default=False,
    ),
]
PartitionRuleOpt = Annotated[
    str,
    typer.Option(
        "--partition-rule",
        help="With --partitions: tvtool (every tensor of 2+ dims partitioned, the others one "
        "coefficient) or atlas (only 2-D weights, the others not composed, as the released code).",
    ),
]
FinetunedAccOpt = Annotated[
    Path | None,
    typer.Option(
        "--finetuned-acc",
        help='JSON {"dataset": accuracy} (or a tvtool eval --json report): addition keeps the '
        "epoch of best mean normalised validation accuracy.",
        show_default=False,
        dir_okay=False,
    ),
]
AccumOpt = Annotated[
    int, typer.Option("--grad-accum", help="Micro-batches per optimisation step.", min=1)
]
WdOpt = Annotated[
    float | None,
    typer.Option(
        "--weight-decay",
        help="AdamW weight decay on the coefficients (pulls them to 0; default 0.1 as aTLAS, "
        "0 for entropy as AdaMerging's Adam).",
        show_default=False,
    ),
]
ValOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--val",
        help="Validation data (folder, HF data or CSV), one per --data (model selection by "
        "accuracy).",
        show_default=False,
    ),
]
ValSplitOpt = Annotated[
    float | None,
    typer.Option(
        "--val-split",
        help="Hold out this fraction of each class for validation.",
        show_default=False,
    ),
]
NegateOpt = Annotated[
    Path | None,
    typer.Option(
        "--negate",
        help="Forget this data set (maximise its loss; PATH or NAME=PATH like --data)...",
        show_default=False,
    ),
]
ControlOpt = Annotated[
    Path | None,
    typer.Option(
        "--control",
        help="...while keeping >= 95% of the base accuracy on this one (PATH or NAME=PATH).",
        show_default=False,
    ),
]
SelectionOpt = Annotated[
    str | None,
    typer.Option(
        "--selection",
        help="Learn (and load) only the pairs this `tvtool select` result keeps.",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Data-loading processes (default: 0 on CPU, up to 8 per process on CUDA).",
        min=0,
        show_default=False,
    ),
]
FlipOpt = Annotated[
    bool, typer.Option("--flip", help="Add random horizontal flips to the few-shot augmentation.")
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run of the same configuration from its last epoch.",
    ),
]


class RichReporter:
    """Progress on stderr, only in a terminal: a bar per epoch and one line per finished epoch
    (the final table repeats every epoch, so logs lose nothing)."""

    def __init__(self, enabled: bool):
        from tvtool.cli.output import err, progress

        self.enabled = enabled and err.is_terminal
        self.bar = progress() if self.enabled else None
        self.task: Any = None

    def __enter__(self) -> RichReporter:
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.__exit__(*exc)

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bar:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch}", total=steps)

    def step(self) -> None:
        if self.bar and self.task is not None:
            self.bar.advance(self.task)

    def end_epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tvtool.cli.output import info

        acc = "  ".join(f"{k} {100 * v:.1f}%" for k, v in record["val_acc"].items())
        loss = record["train_loss"]
        info(
            f"epoch {record['epoch']:>3}  loss {loss:.4f}" + (f"  val {acc}" if acc else "")
            if loss is not None
            else f"epoch {record['epoch']}  loss nan"
        )


SELECT_BY = {
    "val": "best validation accuracy",
    "negation": "most forgetting within the control constraint",
    "last": "last epoch",
}


def render(report: ComposeReport) -> None:
    """The people's view on stderr: one row per epoch, the bank's size, what was kept."""
    from tvtool.cli.output import Col, info, stored, table

    h = report.history
    names = list(h[0].val_acc) if h and h[0].val_acc else []
    cols = [Col("epoch", "right"), Col("train loss", "right"),
            *(Col(f"val {n}", "right") for n in names)]
    rows = [
        [
            f"{r.epoch}{' *' if r.epoch == report.epoch else ''}",
            "-" if r.train_loss is None else f"{r.train_loss:.4f}",
            *(f"{100 * r.val_acc[n]:.1f}%" for n in names),
        ]
        for r in h
    ]
    table(cols, rows, title="compose")
    info(
        f"{len(report.vectors)} vectors x {report.groups} groups "
        f"({report.blocks} blocks), {report.learnable} learned; vectors on "
        f"{report.device}: {report.vector_bytes / 1e6:.1f} MB"
    )
    info(f"kept epoch {report.epoch} ({SELECT_BY[report.select_by]})")
    stored("coefs", report.digest, report.name)


@with_options(model_options("train"), after="vectors")
@with_options(learn_options("auto"), output_options())
def compose_command(
    vectors: OptVectors = None,
    val: ValOpt = None,
    val_split: ValSplitOpt = None,
    negate: NegateOpt = None,
    control: ControlOpt = None,
    partitions: PartitionsOpt = 1,
    partition_rule: PartitionRuleOpt = "tvtool",
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: ComposeBatchOpt = None,
    grad_accum: AccumOpt = 1,
    weight_decay: WdOpt = None,
    schedule: ScheduleOpt = None,
    clip_grad: ClipGradOpt = None,
    augment: AugmentOpt = None,
    min_steps: MinStepsOpt = None,
    init: InitOpt = 0.0,
    clamp: ClampOpt = None,
    finetuned_acc: FinetunedAccOpt = None,
    selection: SelectionOpt = None,
    workers: WorkersOpt = None,
    flip: FlipOpt = False,
    resume: ResumeOpt = False,
    **shared: Any,
) -> None:
    """Learn block-wise coefficients (aTLAS) for task VECTORS on a few images; store a `coefs`.

    theta = theta_0 + sum_t Lambda[t, block] * tau_t, Lambda from 0, base and vectors frozen.
    Several --data sets: task addition (losses summed). --negate T --control C: forgetting.
    Runs under `torchrun --nproc-per-node N -m tvtool compose ...` as DistributedDataParallel.
    """
    flags = {**locals(), **shared}  # the flags, before any name of the body
    from tvtool.cli.output import emit, warn
    from tvtool.compose.compose_run import compose
    from tvtool.compose.ddp import init_from_env
    from tvtool.compose.recipes import parse_clamp
    from tvtool.compose.requests import ComposeRequest
    from tvtool.models.eval_run import load_finetuned_acc

    quiet, json_out = flags["quiet"], flags["json_out"]
    req = ComposeRequest.from_flags(
        flags,
        **learn_fields(flags),
        clamp=parse_clamp(clamp),
        finetuned_acc=load_finetuned_acc(finetuned_acc) if finetuned_acc else None,
    )
    dist, device = init_from_env(flags["device"])
    try:
        clip = req.model.load(device, warn=warn)
        show = dist.main and not quiet and not json_out
        with RichReporter(show) as rep:
            report = compose(req, clip, dist, reporter=rep, warn=warn if dist.main else None)
    finally:
        dist.close()
    if not dist.main:
        return
    emit(report, json_out=json_out, quiet=quiet, human=render, data=[report.digest or ""])


def register(app: typer.Typer) -> None:
    from tvtool.compose.recipes import help_table

    epilog = (
        "Defaults per run kind (the authors' settings; options override them): \n\n" + help_table()
    )
    app.command("compose", epilog=epilog)(compose_command)
