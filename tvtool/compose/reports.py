"""What `compose` and `select` return: typed reports, read by the CLI's human renderers and
printed by `--json` (`Report.doc()`). Field names are the documents' keys (scripts read them).
Torch-free."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from tvtool.request import Report


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VectorRef(_Part):
    """A vector of the bank: its digest and the label tables show."""

    digest: str
    label: str


class DataInfo(_Part):
    """One data set of a run: where it is, how many classes and images were used."""

    name: str
    role: str | None = None  # compose: task, negate or control
    path: str
    classes: int
    dataset: str | None = None  # the built-in data set it was named after
    templates: int | None = None  # the data set's own templates
    trusted: int | None = None  # pseudo: images with a confident zero-shot label
    pseudo_kept: int | None = None
    train: int
    val: int


class EpochRecord(_Part):
    """One epoch of compose's history (epoch 0: the start, Lambda at --init, not trained)."""

    epoch: int
    train_loss: float | None
    task_losses: dict[str, float | None] | None
    val_acc: dict[str, float]
    lr: float | None


class ComposeSettings(_Part):
    """The settings a compose run used (the recipe's defaults with the user's options)."""

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float
    schedule: str
    clip_grad: float | None
    augment: str
    oversampling: list[int]  # per data set: how many times its training images repeat
    init: float
    clamp: list[float] | None


class ComposeReport(Report):
    """A compose run: the bank, the data, every epoch, the kept epoch and its coefficients
    `coefs[t][g]` (vector t, group g of `block_names`); `digest` is the stored `coefs` object
    (None on DDP ranks other than 0)."""

    digest: str | None
    name: str | None
    vectors: list[VectorRef]
    blocks: int
    groups: int
    learnable: int
    vector_bytes: int
    steps: int
    device: str
    resumed_from: int | None
    objective: str
    shots: int | None
    seed: int
    lr: float
    epoch: int
    select_by: str
    val_acc: dict[str, float]
    base_val_acc: dict[str, float]
    history: list[EpochRecord]
    data: list[DataInfo]
    selection: str | None
    world_size: int
    recipe: str
    settings: ComposeSettings
    coefs: list[list[float]]
    block_names: list[str]


class _SelectCommon(Report):
    score: str
    vectors: list[VectorRef]
    data: list[DataInfo]
    shots: int | None
    seed: int
    base_fingerprint: str | None
    objective: str | None


class SelectionReport(_SelectCommon):
    """`select` with --top/--budget-mb: `scores[t][b]` per (vector, block), the `keep` pairs
    (t, b), and their device bytes; `digest` is the stored `selection`."""

    kind: Literal["selection"]
    digest: str
    name: str | None
    granularity: str
    blocks: list[str]
    scores: list[list[float]]
    keep: list[tuple[int, int]]
    bytes: int
    total_bytes: int
    top: int | None
    budget_mb: float | None


class MaskInfo(_Part):
    """One stored mask: which vector, how many of its scored elements it keeps, per layer."""

    vector: str
    label: str
    digest: str
    name: str | None
    kept: int
    scored: int
    kept_by_layer: dict[str, float]


class MasksReport(_SelectCommon):
    """`select --density`: one mask per vector (`masks`), each keeping `density` of it."""

    kind: Literal["mask"]
    density: float
    masks: list[MaskInfo]


SelectReport = SelectionReport | MasksReport
