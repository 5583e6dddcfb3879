"""The torch-free halves of compose's registries: each objective's parameters and each select
score's capabilities. The CLI and the requests read them (choices, validation) without importing
torch; the maths lives in `objectives` (losses, keyed by the same names) and `select`.

Add an objective: its `Params` class here (fields = its flags, with defaults and bounds), added
to `ObjectiveParams` and `OBJECTIVES`, and its `Objective` in `objectives.OBJECTIVES`
(`tests/test_requests.py` checks the two agree). Add a score: a `Score` in `SCORES` and its
scoring in `select_run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tvtool.errors import TvtoolError


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CeParams(_Params):
    """ce: cross-entropy on labelled few-shot images (the zero-shot head classifies)."""

    name: Literal["ce"] = "ce"


class EntropyParams(_Params):
    """entropy: prediction entropy on unlabelled images (AdaMerging)."""

    name: Literal["entropy"] = "entropy"


class PseudoParams(_Params):
    """pseudo: the zero-shot model's predictions whose confidence reaches `threshold`."""

    name: Literal["pseudo"] = "pseudo"
    threshold: float = Field(0.99, ge=0.0, le=1.0)


class UfmParams(_Params):
    """ufm: aTLAS's unsupervised FixMatch, online: the current model's confident predictions on
    a weak view are the targets of a strong view, plus a trusted top-k per class of zero-shot."""

    name: Literal["ufm"] = "ufm"
    threshold: float = Field(0.99, ge=0.0, le=1.0)


ObjectiveParams = Annotated[
    CeParams | EntropyParams | PseudoParams | UfmParams, Field(discriminator="name")
]
OBJECTIVES: dict[str, type[_Params]] = {
    "ce": CeParams,
    "entropy": EntropyParams,
    "pseudo": PseudoParams,
    "ufm": UfmParams,
}


def objective_params(name: str, **flags: Any) -> dict[str, Any]:
    """Objective `name`'s parameters from the CLI's flags (those it does not own are left out),
    for the request to validate."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise TvtoolError(
            f"unknown objective {name!r}: choose from {', '.join(OBJECTIVES)}"
        ) from None
    owned = {k: v for k, v in flags.items() if k in cls.model_fields and v is not None}
    return {"name": name, **owned}


def threshold_of(params: Any) -> float | None:
    """The pseudo-label confidence threshold, for objectives that have one."""
    return getattr(params, "threshold", None)


@dataclass(frozen=True)
class Score:
    """A select score: what it needs and what it can write."""

    name: str
    summary: str
    needs_data: bool  # the model and --data (a loss gradient), or data-free
    pairs: bool  # can keep (vector, block) pairs: a `selection` (--top / --budget-mb)
    masks: bool  # can keep elements: one `mask` per vector (--density)
    masks_by_default: bool = False  # writes masks without --density


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score("grad", "|dL/dLambda| per (vector, block) at Lambda = 0", True, True, False),
        Score("fisher", "sum over batches of (dL/dLambda)^2 (disagreeing batches add up)", True,
              True, False),
        Score("fisher-unit", "fisher / ||tau_block||^2: the Fisher along tau's unit direction "
              "(scale-free)", True, True, False),
        Score("gain", "per block, the best subset of --top vectors by the loss decrease of a "
              "quadratic (empirical-Fisher) model, g_S^T F_SS^-1 g_S / 2 (scale-free)", True,
              True, False),
        Score("importance", "|tau * dL/dtheta| per element", True, False, True, True),
        Score("norm", "data-free |tau| (pairs by block norm, masks by magnitude)", False, True,
              True),
    )
}
