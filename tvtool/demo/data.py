"""The zoo's data: stratified disjoint splits of the digits, rendered per domain, as image folders.

Layout: `DATA/<domain>/<split>/<class>/<index>.png` (class directories "zero".."nine", 16x16 RGB).
Pre-training domains get a `pretrain` split; every domain gets `train` (fine-tuning, and the pool
few shots are drawn from), `val` and `test` (the split names `compose` and `eval` look for).
The PNG bytes equal the uint8 tensors the zoo trains on, so commands reading the folders see
exactly the images the models were trained and evaluated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tvtool.demo.domains import CLASSNAMES, apply_domain, load_digits_grey, to_uint8
from tvtool.demo.recipe import Splits

SPLITS = ("pretrain", "train", "val", "test")


@dataclass
class DomainData:
    """uint8 images [N, S, S, 3], labels [N] and dataset indices [N] of one (domain, split)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def split_indices(labels: torch.Tensor, fractions: Splits, seed: int) -> dict[str, torch.Tensor]:
    """Disjoint, stratified, seeded splits of the dataset indices (each sorted ascending)."""
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        n_pre = round(n * fractions.pretrain)
        n_ft = round(n * fractions.train)
        n_val = round(n * fractions.val)
        bounds = [0, n_pre, n_pre + n_ft, n_pre + n_ft + n_val, n]
        for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            parts[s].append(idx[lo:hi])
    return {s: torch.cat(v).sort().values for s, v in parts.items()}


def domain_splits(domain: str, pretrain: bool) -> tuple[str, ...]:
    return SPLITS if pretrain else SPLITS[1:]


def render(
    domains: list[str], pretrain_domains: list[str], fractions: Splits, seed: int, image_size: int
) -> dict[str, dict[str, DomainData]]:
    """All (domain, split) image sets, in memory."""
    grey, labels = load_digits_grey(image_size)
    splits = split_indices(labels, fractions, seed)
    out: dict[str, dict[str, DomainData]] = {}
    for d in domains:
        out[d] = {}
        for s in domain_splits(d, d in pretrain_domains):
            idx = splits[s]
            rgb = apply_domain(d, grey[idx], idx)
            out[d][s] = DomainData(to_uint8(rgb), labels[idx], idx)
    return out


def write_image_folders(root: Path, data: dict[str, dict[str, DomainData]]) -> int:
    """Write every set as PNG image folders under `root`; returns the number of files."""
    from PIL import Image

    count = 0
    for d, by_split in data.items():
        for s, dd in by_split.items():
            for c in CLASSNAMES:
                (root / d / s / c).mkdir(parents=True, exist_ok=True)
            arr = dd.images.numpy()
            for row, (label, i) in enumerate(
                zip(dd.labels.tolist(), dd.indices.tolist(), strict=True)
            ):
                path = root / d / s / CLASSNAMES[label] / f"{i:04d}.png"
                Image.fromarray(arr[row], mode="RGB").save(path, format="PNG")
                count += 1
    return count


def read_image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read back a folder written above: uint8 images [N, S, S, 3] and labels [N] (class index)."""
    import numpy as np
    from PIL import Image

    images, labels = [], []
    for c, name in enumerate(CLASSNAMES):
        for p in sorted((folder / name).glob("*.png")):
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(c)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)
