"""Image-folder data: ``DIR/<class>/*.png|jpg|jpeg``, few-shot sampling, splits, transforms.

Folder convention. `--data DIR` with a split name S (eval: ``test``; training: ``train``; `--val`:
``val``): when ``DIR/S`` is a directory it is used (the example zoo writes
``zoo/data/<domain>/<split>/<class>/*.png``), otherwise DIR itself must hold the class folders.
Classes are the sub-directories in sorted order (class index = position, as torchvision does);
files are sorted within each class. Class names shown to the text tower are the directory names
with ``_`` replaced by a space, or the lines of `--classnames FILE` (one per line, in class-index
order). A directory with images directly in it (no class folders) is accepted as *unlabelled*
data (labels -1) when a class-names file is given, for the unsupervised objectives.

Transforms follow the model's open_clip preprocessing (resize the short side to image_size with
the model's interpolation, centre crop, normalise with its mean/std). Few-shot training adds a
mild random resized crop (scale 0.8-1) and, only with ``flip=True``, horizontal flips (off by
default: flips change the meaning of digits and text); ``strong=True`` (pseudo-label views) uses
scale 0.5-1 and colour jitter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from tvtool.errors import TvtoolError
from tvtool.models.build import LoadedClip

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
Transform = Callable[[object], torch.Tensor]


def resolve_data_dir(path: str | Path, split: str | None = None) -> tuple[Path, str]:
    """(directory holding the class folders, data-set name) for `--data DIR` and a split name."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise TvtoolError(f"data directory not found: {p}")
    if split and (p / split).is_dir():
        return p / split, p.resolve().name
    return p, p.resolve().name


def _images_in(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)


class ImageFolder:
    """Sorted (path, label) samples of an image folder; images decoded on demand."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        classnames_file: Path | None = None,
        cache: bool = False,
    ):
        from tvtool.models.heads import read_lines

        self.root, self.name = resolve_data_dir(root, split)
        self.cache = cache
        self._memo: dict[int, object] = {}
        class_dirs = sorted(
            d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        given = read_lines(classnames_file, "class names") if classnames_file is not None else None
        if not class_dirs:
            loose = _images_in(self.root)
            if loose and given is not None:  # unlabelled images + class names
                self.classes = []
                self.classnames = given
                self.samples = [(f, -1) for f in loose]
                self.labelled = False
                self._check_classes(given)
                return
            hint = " (unlabelled images need --classnames FILE)" if loose else ""
            raise TvtoolError(
                f"{self.root}: no class folders (expected DIR/<class>/*.png|jpg){hint}"
            )
        self.classes = [d.name for d in class_dirs]
        self.labelled = True
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, d in enumerate(class_dirs):
            files = _images_in(d)
            if not files:
                empty.append(d.name)
            self.samples.extend((f, label) for f in files)
        if not self.samples:
            raise TvtoolError(f"{self.root}: no images (*.png, *.jpg, *.jpeg) in its class folders")
        if empty:
            raise TvtoolError(
                f"{self.root}: class folder(s) without images: {', '.join(empty[:5])}"
            )
        if given is not None and len(given) != len(self.classes):
            raise TvtoolError(
                f"{classnames_file} lists {len(given)} class names but {self.root} has "
                f"{len(self.classes)} class folders"
            )
        self.classnames = (
            given if given is not None else [c.replace("_", " ") for c in self.classes]
        )
        self._check_classes(self.classnames)

    def _check_classes(self, names: Sequence[str]) -> None:
        if len(names) < 2:
            raise TvtoolError(
                f"{self.root}: a classifier needs at least 2 classes, found {len(names)}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [lab for _, lab in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def load(self, i: int):
        """The i-th image as an RGB PIL image."""
        if i in self._memo:
            return self._memo[i]
        from PIL import Image, UnidentifiedImageError

        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise TvtoolError(f"cannot read image {path}: {e}") from None
        if self.cache:
            self._memo[i] = img
        return img

    def subset(self, indices: Sequence[int], transform: Transform) -> Subset:
        return Subset(self, indices, transform)


class Subset(torch.utils.data.Dataset):
    """`indices` of a folder with a transform: a map-style dataset of (image tensor, label)."""

    def __init__(self, folder: ImageFolder, indices: Sequence[int], transform: Transform):
        self.folder, self.indices, self.transform = folder, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = self.indices[j]
        return self.transform(self.folder.load(i)), self.folder.samples[i][1]


def open_folders(
    data: Sequence[str | Path],
    split: str | None,
    classnames: Sequence[Path] | None = None,
    cache: bool = False,
) -> list[ImageFolder]:
    """One ImageFolder per data directory; class-name files one-for-all or one per directory."""
    if not data:
        raise TvtoolError("give at least one --data DIR")
    files = pair_classnames(classnames, len(data))
    return [ImageFolder(d, split, f, cache) for d, f in zip(data, files, strict=True)]


def pair_classnames(classnames: Sequence[Path] | None, n: int) -> list[Path | None]:
    """`--classnames` files for `n` data sets: none, one for all, or one per set."""
    names = list(classnames or [])
    if len(names) not in (0, 1, n):
        raise TvtoolError(
            f"give one --classnames file for all --data sets or one per set ({n}), "
            f"not {len(names)}"
        )
    return names * n if len(names) == 1 else (names or [None] * n)


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


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}.get(
        name, InterpolationMode.BICUBIC
    )


def eval_transform(clip: LoadedClip) -> Transform:
    """The model's preprocessing: resize short side, centre crop, to tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(
                min(clip.image_size), interpolation=_interp(clip.interpolation), antialias=True
            ),
            T.CenterCrop(clip.image_size),
            T.ToTensor(),
            T.Normalize(clip.mean, clip.std),
        ]
    )


def train_transform(clip: LoadedClip, flip: bool = False, strong: bool = False) -> Transform:
    """Few-shot augmentation: random resized crop (scale 0.8-1; 0.5-1 when strong), optional
    horizontal flip, colour jitter when strong; then normalise like `eval_transform`."""
    from torchvision import transforms as T

    steps: list = [
        T.RandomResizedCrop(
            clip.image_size,
            scale=(0.5, 1.0) if strong else (0.8, 1.0),
            ratio=(0.9, 1.1),
            interpolation=_interp(clip.interpolation),
            antialias=True,
        )
    ]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if strong:
        steps.append(T.ColorJitter(0.4, 0.4, 0.4))
    steps += [T.ToTensor(), T.Normalize(clip.mean, clip.std)]
    return T.Compose(steps)


def load_tensors(
    folder: ImageFolder, indices: Sequence[int], transform: Transform
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a small set: (images [N, 3, H, W], labels [N] long)."""
    if not indices:
        raise TvtoolError(f"{folder.root}: no images selected")
    imgs = [transform(folder.load(i)) for i in indices]
    labels = torch.tensor([folder.samples[i][1] for i in indices], dtype=torch.long)
    return torch.stack(imgs), labels


def iter_batches(
    folder: ImageFolder, indices: Sequence[int] | None, transform: Transform, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images, labels) over `indices` (default: all) in order, decoded as they go."""
    if batch_size < 1:
        raise TvtoolError(f"--batch-size must be >= 1 (got {batch_size})")
    idx = list(range(len(folder))) if indices is None else list(indices)
    for s in range(0, len(idx), batch_size):
        yield load_tensors(folder, idx[s : s + batch_size], transform)
