"""The one registry of compose objectives, and the roles data sets play (learn / forget / keep).

Objectives give a per-sample loss from logits (and labels):

* `ce`: cross-entropy on labelled few-shot images (the frozen zero-shot head is the classifier);
* `entropy`: prediction entropy on unlabelled images (AdaMerging / test-time adaptation);
* `pseudo`: cross-entropy against the *zero-shot* model's own predictions, kept only where its
  confidence reaches `--threshold` (0.99), on strongly augmented views (labels are not used).

Roles: a data set is learned (`task`, sign +1: its loss is minimised; several are summed for task
addition), forgotten (`target`, sign -1: its loss is maximised) or protected (`control`, sign +1).
Negation therefore minimises `-L_target + L_control`; the loss being unbounded, the run keeps the
epoch whose coefficients forget most (lowest target accuracy) among those that keep the control
accuracy >= `CONTROL_KEEP` x the base model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tvtool.errors import TvtoolError
from tvtool.models.evaluate import CONTROL_KEEP

Role = Literal["task", "target", "control"]
SIGN: dict[str, float] = {"task": 1.0, "target": -1.0, "control": 1.0}


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    labelled: bool  # training needs class folders
    pseudo_labels: bool  # targets are the zero-shot model's confident predictions
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> [N]


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def _entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "ce",
            "few-shot cross-entropy with the zero-shot head",
            True,
            False,
            _ce,
        ),
        Objective(
            "entropy",
            "entropy minimisation on unlabelled images",
            False,
            False,
            _entropy,
        ),
        Objective(
            "pseudo",
            "confident zero-shot pseudo-labels on strongly augmented views",
            False,
            True,
            _ce,
        ),
    )
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise TvtoolError(
            f"unknown objective {name!r}: choose from {', '.join(OBJECTIVES)}"
        ) from None


@torch.no_grad()
def confident(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, mask of predictions whose softmax probability >= threshold)."""
    p = F.softmax(logits.float(), dim=-1)
    conf, pred = p.max(dim=-1)
    return pred, conf >= threshold


def keeps_control(control_acc: float, base_control_acc: float) -> bool:
    return control_acc >= CONTROL_KEEP * base_control_acc - 1e-12
