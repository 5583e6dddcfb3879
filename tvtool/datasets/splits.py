"""Few-shot sampling and validation splits, seeded so a run can be repeated exactly.

`few_shot_indices`: k images per class, drawn class by class from a torch generator seeded with
`--seed`. `split_val`: a stratified hold-out (about `fraction` of each class, at least one image
of any class with two or more, never a whole class), drawn before few-shot sampling so the
validation images are never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvtool.errors import TvtoolError


def few_shot_indices(
    labels: Sequence[int], k: int, seed: int, classnames: Sequence[str] | None = None
) -> list[int]:
    """k indices per class, drawn with `seed` (same inputs -> same indices), class by class."""
    if k < 1:
        raise TvtoolError(f"--shots must be >= 1 (got {k})")
    by_class = _by_class(labels)
    if any(c < 0 for c in by_class):
        raise TvtoolError("few-shot sampling needs labelled data (class folders)")
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c]
        if k > len(idx):
            name = classnames[c] if classnames is not None and c < len(classnames) else str(c)
            raise TvtoolError(
                f"--shots {k} is larger than class {name!r}, which has {len(idx)} image(s)"
            )
        perm = torch.randperm(len(idx), generator=g)[:k].tolist()
        out.extend(sorted(idx[j] for j in perm))
    return out


def split_val(
    labels: Sequence[int], indices: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified (train, val) split of `indices`: about `fraction` of each class to val, at least
    one per class that has two or more, never a whole class."""
    if not 0.0 < fraction < 1.0:
        raise TvtoolError(f"--val-split must be between 0 and 1 (got {fraction})")
    g = torch.Generator().manual_seed(seed + 7919)
    by_class = _by_class([labels[i] for i in indices])
    idx_list = list(indices)
    train: list[int] = []
    val: list[int] = []
    for c in sorted(by_class):
        members = [idx_list[j] for j in by_class[c]]
        n = len(members)
        n_val = 0 if n < 2 else min(max(1, round(fraction * n)), n - 1)
        perm = torch.randperm(n, generator=g).tolist()
        val.extend(sorted(members[j] for j in perm[:n_val]))
        train.extend(sorted(members[j] for j in perm[n_val:]))
    return sorted(train), sorted(val)


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        out.setdefault(int(lab), []).append(i)
    return out
