"""The data sets of a run: data sources -> training samples, validation samples and a head.

For each data set: open the folder (split `train` when DIR/train exists), split off validation
images (`--val DIR`, or a stratified `--val-split` fraction of all images) *before* drawing
`--shots k` images per class (seeded) from the rest; build the frozen zero-shot head from the
class names. `pseudo` replaces the labels by the zero-shot model's confident predictions (images
below the threshold are dropped) so the run never reads the folder's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvtool.compose.ddp import Dist
from tvtool.compose.objectives import Objective, Role, confident
from tvtool.datasets import images as mdata
from tvtool.datasets.images import pair_classnames
from tvtool.datasets.sources import open_source
from tvtool.datasets.splits import few_shot_indices, split_val
from tvtool.errors import TvtoolError
from tvtool.models.functional import autocast, encode_images


@dataclass
class DataSpec:
    """What the command line says about one data set."""

    path: Path
    role: Role = "task"
    val: Path | None = None
    classnames: Path | None = None
    head: Path | None = None  # a head file instead of the text tower's head


@dataclass
class PreparedData:
    name: str
    role: Role
    folder: Any  # ImageSource
    train_idx: list[int]
    labels: list[int]  # training targets for train_idx (true labels, pseudo-labels or -1)
    head: torch.Tensor  # [C, D] on the device
    eval_folder: Any | None = None  # validation images (None: no validation)
    eval_idx: list[int] = field(default_factory=list)
    eval_is_train: bool = False  # no held-out images: checked on the training images
    info: dict[str, Any] = field(default_factory=dict)


class LabelledSubset(torch.utils.data.Dataset):
    """(image tensor, target) for `indices` of a folder, with explicit targets."""

    def __init__(self, folder: Any, indices: list[int], labels: list[int], transform: Any):
        self.folder, self.indices, self.labels, self.transform = folder, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.folder.load(self.indices[j])), self.labels[j]


def prepare_data(
    clip: Any,
    spec: DataSpec,
    objective: Objective,
    *,
    shots: int | None,
    val_split: float | None,
    seed: int,
    templates: list[str] | None,
    store: Any,
    threshold: float,
    batch_size: int,
    dist: Dist,
    split: str = "train",
) -> PreparedData:
    from tvtool.models.heads import zeroshot_head

    folder = open_source(spec.path, split, spec.classnames)
    needs_labels = objective.labelled or spec.role != "task"
    what = {"task": "--data", "target": "--negate", "control": "--control"}[spec.role]
    if needs_labels and not folder.labelled:
        why = (
            "negation needs labels to measure forgetting"
            if spec.role != "task"
            else f"objective {objective.name} needs labels"
        )
        raise TvtoolError(
            f"{what} {spec.path}: no class folders ({why}; expected DIR/<class>/*.png)"
        )
    labels = folder.labels
    indices = list(range(len(folder)))
    eval_folder, eval_idx = None, []
    if spec.val is not None:
        eval_folder = open_source(spec.val, "val", spec.classnames, dataset=folder.dataset)
        if not eval_folder.labelled:
            raise TvtoolError(f"--val {spec.val}: validation images need class folders")
        if eval_folder.classes != folder.classes:
            raise TvtoolError(f"--val {spec.val}: its class folders differ from {spec.path}'s")
        eval_idx = list(range(len(eval_folder)))
    elif val_split:
        if not folder.labelled:
            raise TvtoolError(f"--val-split on {spec.path}: unlabelled images cannot be validated")
        indices, eval_idx = split_val(labels, indices, val_split, seed)
        eval_folder = folder
        if not eval_idx:
            raise TvtoolError(f"--val-split {val_split} leaves no validation images in {spec.path}")
    if shots is not None:
        if not folder.labelled:
            raise TvtoolError(f"--shots on {spec.path}: few-shot sampling needs class folders")
        sub = few_shot_indices([labels[i] for i in indices], shots, seed, folder.classnames)
        indices = [indices[j] for j in sub]
    head = zeroshot_head(
        clip, folder.classnames, templates or folder.templates, store, head_file=spec.head
    )
    targets = [labels[i] for i in indices]
    info: dict[str, Any] = {"path": str(Path(folder.root).resolve()), "classes": folder.num_classes}
    if folder.dataset:
        info["dataset"] = folder.dataset
    if templates is None and folder.templates:
        info["templates"] = len(folder.templates)  # the data set's own (else --templates/defaults)
    if objective.online:  # ufm: every image; trusted ones keep their zero-shot label
        from tvtool.compose.objectives import trusted_labels

        logits = zero_shot_logits(clip, folder, indices, head, batch_size, dist)
        targets = trusted_labels(logits)
        info["trusted"] = sum(t >= 0 for t in targets)
    if objective.pseudo_labels:
        indices, targets, kept = _pseudo_labels(
            clip, folder, indices, head, threshold, batch_size, dist
        )
        info["pseudo_kept"] = kept
        if not indices:
            raise TvtoolError(
                f"{spec.path}: no image's zero-shot confidence reaches --threshold "
                f"{threshold}; lower it"
            )
    if not indices:
        raise TvtoolError(f"{spec.path}: no training images")
    info.update(train=len(indices), val=len(eval_idx))
    task = PreparedData(
        folder.name, spec.role, folder, indices, targets, head, eval_folder, eval_idx, info=info
    )
    if eval_folder is None and spec.role != "task":  # negation must measure accuracy somewhere
        task.eval_folder, task.eval_idx, task.eval_is_train = folder, list(indices), True
    return task


def data_specs(
    data: list[Path],
    val: list[Path] | None = None,
    classnames: list[Path] | None = None,
    negate: Path | None = None,
    control: Path | None = None,
    heads: list[Path] | None = None,
) -> list[DataSpec]:
    """--data/--val/--classnames/--negate/--control -> DataSpecs (val and class names paired;
    --head files one per data set in the order --data..., --negate, --control)."""
    val = list(val or [])
    if val and len(val) != len(data):
        raise TvtoolError(f"give one --val DIR per --data ({len(data)}), not {len(val)}")
    names = pair_classnames(classnames, len(data))
    specs = [
        DataSpec(Path(d), "task", val[i] if val else None, names[i]) for i, d in enumerate(data)
    ]
    if negate is not None:
        specs.append(DataSpec(Path(negate), "target"))
    if control is not None:
        specs.append(DataSpec(Path(control), "control"))
    if heads:
        if len(heads) != len(specs):
            raise TvtoolError(
                f"give one --head file per data set ({len(specs)}, in the order --data..., "
                f"--negate, --control), not {len(heads)}"
            )
        for spec, h in zip(specs, heads, strict=True):
            spec.head = Path(h)
    return specs


@torch.no_grad()
def zero_shot_logits(
    clip: Any, folder: Any, indices: list[int], head: torch.Tensor, batch_size: int, dist: Dist
):
    """Logits of the base model for `indices` (eval preprocessing), computed sharded by rank and
    summed across ranks, so every process gets identical values."""
    tf = mdata.eval_transform(clip)
    out = torch.zeros(len(indices), head.shape[0], device=clip.device)
    mine = list(range(dist.rank, len(indices), dist.world))
    scale = clip.logit_scale
    for s in range(0, len(mine), batch_size):
        pos = mine[s : s + batch_size]
        images, _ = mdata.load_tensors(folder, [indices[p] for p in pos], tf)
        with autocast(clip.device):
            feats = encode_images(clip, None, images.to(clip.device))
        out[pos] = scale * feats.float() @ head.T
    return dist.all_reduce_sum(out)


def _pseudo_labels(clip, folder, indices, head, threshold, batch_size, dist):
    logits = zero_shot_logits(clip, folder, indices, head, batch_size, dist)
    pred, ok = confident(logits, threshold)
    keep = ok.nonzero().squeeze(1).tolist()
    return [indices[j] for j in keep], [int(pred[j]) for j in keep], len(keep)
