"""The one registry of compose objectives, and the roles data sets play (learn / forget / keep).

Objectives give a per-sample loss from logits (and labels):

* `ce`: cross-entropy on labelled few-shot images (the frozen zero-shot head is the classifier);
* `entropy`: prediction entropy on unlabelled images (AdaMerging / test-time adaptation);
* `pseudo`: cross-entropy against the *zero-shot* model's own predictions, kept only where its
  confidence reaches `--threshold` (0.99), on strongly augmented views (labels are not used);
* `ufm`: aTLAS's unsupervised FixMatch (learn_ufm.py), online: each step the current model's
  softmax on a weak view (eval preprocessing) is the soft target of a strong view (crop 0.5-1 +
  flip) where its top probability exceeds `--threshold`, and a trusted top-k per class of
  zero-shot predictions keeps its label (`trusted_labels`, `ufm_loss`). Deliberate differences:
  losses are averaged over all images of a step (atlas: over the kept ones), and every class's
  trusted images are marked (atlas marks the last class's only).

Training settings per objective (the authors'): `tvtool.compose.recipes`.

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
    online: bool = False  # ufm: targets recomputed every step from a weak view (see `ufm_loss`)


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
        Objective(
            "ufm",
            "online FixMatch: confident weak-view predictions as strong-view targets",
            False,
            False,
            _ce,
            online=True,
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


def trusted_labels(logits: torch.Tensor, per_class: int | None = None) -> list[int]:
    """aTLAS UFM's trusted set (learn_ufm.py): for every class c the `per_class` images with the
    highest zero-shot probability of c (k = min(N / C / 10, 100) by default), labelled with their
    zero-shot prediction; the others -1. (The released code marks only the last class's ids as
    trusted, a slip; tvtool marks every class's.)"""
    n, c = logits.shape
    k = per_class if per_class is not None else min(int(n / c / 10), 100)
    probs = F.softmax(logits.float(), dim=-1)
    pred = probs.argmax(dim=-1)
    labels = [-1] * n
    if k < 1:
        return labels
    for cls in range(c):
        for i in torch.argsort(probs[:, cls], descending=True)[:k].tolist():
            labels[i] = int(pred[i])
    return labels


def ufm_loss(
    strong: torch.Tensor, weak: torch.Tensor, trusted: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Per-sample UFM loss: soft cross-entropy of the strong view's logits against the weak view's
    (detached) softmax, or the trusted one-hot label where `trusted` >= 0, kept where the target's
    top probability exceeds `threshold` (trusted targets always are)."""
    target = F.softmax(weak.detach().float(), dim=-1)
    known = trusted >= 0
    if bool(known.any()):
        target = target.clone()
        target[known] = F.one_hot(trusted[known], target.shape[1]).to(target.dtype)
    keep = (target.max(dim=-1).values > threshold) | known
    ce = -(target * F.log_softmax(strong.float(), dim=-1)).sum(dim=-1)
    return ce * keep.to(ce.dtype)


def keeps_control(control_acc: float, base_control_acc: float) -> bool:
    return control_acc >= CONTROL_KEEP * base_control_acc - 1e-12
