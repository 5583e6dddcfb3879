"""What `tvtool compose` and `tvtool select` ask for: typed, validated, torch-free requests.

The CLI builds one from its flags (`Request.build`: errors name the flag), the library builds it
directly; `compose_run.compose(req)` and `select_run.run_select(req)` take nothing else but
runtime hooks (progress, warnings, a model already loaded). Rules that involve several fields
are checked here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tvtool.compose.recipes import Augment, Schedule
from tvtool.compose.registry import SCORES, CeParams, ObjectiveParams
from tvtool.errors import TvtoolError
from tvtool.models.spec import ModelSpec
from tvtool.request import Request
from tvtool.store.store import check_ref_name
from tvtool.vectors.blocks import Granularity, PartitionRule

DeviceDtype = Literal["fp32", "fp16", "bf16"]


class _RunRequest(Request):
    """What compose and select share: vectors, the model, the data, the objective, the result."""

    vectors: list[str] = Field(default_factory=list)
    model: ModelSpec = ModelSpec()
    data: list[Path] = Field(default_factory=list)
    classnames: list[Path] = Field(default_factory=list)  # one for all --data, or one each
    heads: list[Path] = Field(default_factory=list)  # head files instead of the text tower
    templates: list[str] | None = None
    split: str = "train"
    objective: ObjectiveParams = CeParams()
    shots: int | None = Field(None, ge=1)
    granularity: Granularity = "tensor"
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    allow_other_base: bool = False
    name: str | None = None
    force: bool = False
    store: Path | None = None

    @model_validator(mode="after")
    def _name(self):
        if self.name is not None:
            check_ref_name(self.name)
        return self


class ComposeRequest(_RunRequest):
    """Learn aTLAS coefficients: theta = theta_0 + sum_t Lambda[t, block] tau_t."""

    val: list[Path] = Field(default_factory=list)  # one validation folder per --data
    val_split: float | None = Field(None, gt=0.0, lt=1.0)
    negate: Path | None = None  # forget this data set ...
    control: Path | None = None  # ... while keeping this one's accuracy
    partitions: int = Field(1, ge=1)
    partition_rule: PartitionRule = "tvtool"  # atlas: only 2-D weights, the rest not composed
    # None: the default of the run's kind (tvtool.compose.recipes: the authors' settings)
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, ge=0.0)
    batch_size: int | None = Field(None, ge=1)  # per micro-batch and data set when given
    grad_accum: int = Field(1, ge=1)
    weight_decay: float | None = Field(None, ge=0.0)
    schedule: Schedule | None = None
    clip_grad: float | None = Field(None, ge=0.0)  # 0: no clipping
    augment: Augment | None = None
    min_steps: int | None = Field(None, ge=0)
    init: float = 0.0  # every learnable coefficient starts here (AdaMerging: 0.3)
    clamp: tuple[float, float] | None = None  # Lambda = clamp(values, lo, hi) (AdaMerging: 0:1)
    finetuned_acc: dict[str, float] | None = None  # addition: select by normalised accuracy
    selection: str | None = None
    vector_dtype: Literal["auto"] | DeviceDtype = "auto"
    workers: int | None = Field(None, ge=0)
    flip: bool = False
    resume: bool = False

    @model_validator(mode="after")
    def _roles(self):
        if not self.vectors and not self.selection:
            raise TvtoolError("give task VECTORS (or --selection REF)")
        if self.negate is not None and self.control is None:
            raise TvtoolError("--negate needs --control DIR (the data whose accuracy must be kept)")
        if self.control is not None and self.negate is None:
            raise TvtoolError("--control goes with --negate DIR (the data set to forget)")
        if self.negate is not None and self.data:
            raise TvtoolError("--negate and --data cannot be combined: negate first, then add")
        if not self.data and self.negate is None:
            raise TvtoolError("give --data DIR (or --negate DIR --control DIR)")
        return self

    @model_validator(mode="after")
    def _clamp(self):
        if self.clamp is not None and self.clamp[0] > self.clamp[1]:
            raise TvtoolError(f"--clamp takes LO:HI with LO <= HI (got {self.clamp})")
        return self

    @property
    def negation(self) -> bool:
        return self.negate is not None


class SelectRequest(_RunRequest):
    """Score (vector, block) pairs or elements and keep the best: a `selection` or masks."""

    score: str = "grad"
    top: int | None = Field(None, ge=1)
    budget_mb: float | None = Field(None, gt=0.0)
    density: float | None = Field(None, gt=0.0, le=1.0)
    vector_dtype: DeviceDtype = "fp16"  # the dtype --budget-mb counts device bytes in

    @model_validator(mode="after")
    def _kind(self):
        if not self.vectors:
            raise TvtoolError("give at least one task vector")
        self.kind  # noqa: B018  (checks the options make sense together)
        if self.objective.name == "ufm":
            raise TvtoolError(
                "--objective ufm learns from two views per image: select scores with ce, "
                "entropy or pseudo"
            )
        s = SCORES[self.score]
        if s.needs_data and (not self.model.given or not self.data):
            raise TvtoolError(
                f"--score {self.score} needs the model (--model/--base) and --data DIR"
            )
        return self

    @property
    def kind(self) -> Literal["selection", "mask"]:
        """'selection' (pairs) or 'mask' (elements), as the score and options say."""
        if self.score not in SCORES:
            raise TvtoolError(f"unknown --score {self.score!r}: choose from {', '.join(SCORES)}")
        s = SCORES[self.score]
        pairs = self.top is not None or self.budget_mb is not None
        if self.top is not None and self.budget_mb is not None:
            raise TvtoolError("give --top N or --budget-mb M, not both")
        if s.masks and (s.masks_by_default or self.density is not None):
            if pairs:
                raise TvtoolError(
                    f"--score {self.score} with --density writes masks: "
                    "--top/--budget-mb do not apply"
                )
            return "mask"
        if self.density is not None:
            masking = [n for n, x in SCORES.items() if x.masks]
            raise TvtoolError(
                f"--density applies to masks (--score {' or '.join(masking)}, "
                "without --top/--budget-mb)"
            )
        if not pairs:
            raise TvtoolError(
                f"--score {self.score} keeps (vector, block) pairs: give --top N or --budget-mb M"
                + (" (or --density d for masks)" if s.masks else "")
            )
        return "selection"
