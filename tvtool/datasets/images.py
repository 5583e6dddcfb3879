"""Image sources and image folders (``DIR/<class>/*.png|jpg|jpeg``), screening, transforms.

Folder convention. `--data DIR` with a split name S (eval: ``test``; training: ``train``; `--val`:
``val``): when ``DIR/S`` is a directory it is used (the example zoo writes
``zoo/data/<domain>/<split>/<class>/*.png``), otherwise DIR itself must hold the class folders.
Classes are the sub-directories in sorted order (class index = position, as torchvision does);
files are sorted within each class. Class names shown to the text tower are the directory names
with ``_`` replaced by a space, or the lines of `--classnames FILE` (one per line, in class-index
order). A directory with images directly in it (no class folders) is accepted as *unlabelled*
data (labels -1) when a class-names file is given, for the unsupervised objectives.

`ImageSource` is what every source offers (folders here; Hugging Face data and CSV in tables.py):
samples ``(ref, label)`` decoded on demand. Sources are screened when opened: only image headers
are read, unreadable images and decompression bombs are dropped and counted on stderr.

Transforms follow the model's open_clip preprocessing (resize the short side to image_size with
the model's interpolation, centre crop, normalise with its mean/std). Few-shot training adds a
mild random resized crop (scale 0.8-1) and, only with ``flip=True``, horizontal flips (off by
default: flips change the meaning of digits and text); ``strong=True`` (pseudo-label views) uses
scale 0.5-1 and colour jitter.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tvtool.errors import TvtoolError

if TYPE_CHECKING:
    from tvtool.models.loaded import LoadedClip

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


def _note(msg: str) -> None:
    sys.stderr.write(f"warning: {msg}\n")


def screen(items: Sequence[object], opener: Callable[[object], object], where: str) -> list[bool]:
    """Which items hold a readable image of acceptable size, reading only headers.

    An item that PIL cannot identify, or whose header is broken, is skipped; so is a
    decompression bomb (more pixels than PIL's ``Image.MAX_IMAGE_PIXELS``, 89.5 M by default;
    PIL would warn and then refuse at twice that). The counts go to stderr."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS

    def ok(item) -> int:  # 0 readable, 1 unreadable, 2 too large
        try:
            with opener(item) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            return 2
        except Exception:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
            return 1
        return 2 if limit is not None and w * h > limit else 0

    with warnings.catch_warnings():  # counted below instead of one warning per image
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        if workers < 2 or len(items) < 512:  # header parsing holds the GIL: threads only help
            codes = [ok(x) for x in items]  # to overlap slow reads (cold or network storage)
        else:
            with ThreadPoolExecutor(max_workers=workers) as ex:
                codes = list(ex.map(ok, items, chunksize=256))
    bad, big = codes.count(1), codes.count(2)
    if bad:
        _note(f"{where}: skipped {bad} unreadable image(s)")
    if big:
        _note(
            f"{where}: skipped {big} image(s) larger than {limit} pixels (decompression-bomb guard)"
        )
    return [c == 0 for c in codes]


def _open_file(path: object):
    from PIL import Image

    return Image.open(path)  # type: ignore[arg-type]


class ImageSource:
    """Labelled (or unlabelled) images decoded on demand: the interface every data source offers.

    ``samples[i] = (ref, label)``; ``classes`` are the data's own class labels (folder names,
    ClassLabel names, CSV labels) in class-index order, ``classnames`` what the text tower sees.
    ``templates`` is set when a built-in data set says which prompts its papers used."""

    root: Path
    name: str
    classes: list[str]
    classnames: list[str]
    labelled: bool
    samples: list[tuple[object, int]]
    templates: list[str] | None = None
    dataset: str | None = None  # the built-in data set this source was matched to

    def __init__(self, cache: bool = False):
        self.cache = cache
        self._memo: dict[int, object] = {}

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

    def _open(self, ref: object):
        """A PIL image (context manager) for one sample reference."""
        raise NotImplementedError

    def _describe(self, ref: object) -> str:
        return str(ref)

    def load(self, i: int):
        """The i-th image as an RGB PIL image."""
        if i in self._memo:
            return self._memo[i]
        ref = self.samples[i][0]
        try:
            with self._open(ref) as im:
                img = im.convert("RGB")
        except Exception as e:  # unreadable despite a readable header
            raise TvtoolError(f"cannot read image {self._describe(ref)}: {e}") from None
        if self.cache:
            self._memo[i] = img
        return img

    def subset(self, indices: Sequence[int], transform: Transform) -> Subset:
        return Subset(self, indices, transform)

    def _screen(self) -> None:
        keep = screen([r for r, _ in self.samples], self._open, str(self.root))
        self.samples = [s for s, k in zip(self.samples, keep, strict=True) if k]


class ImageFolder(ImageSource):
    """Sorted (path, label) samples of an image folder; images decoded on demand."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        classnames_file: Path | None = None,
        cache: bool = False,
        names: Sequence[str] | None = None,
    ):
        from tvtool.datasets.templates import read_lines

        super().__init__(cache)
        self.root, self.name = resolve_data_dir(root, split)
        class_dirs = sorted(
            d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        given = read_lines(classnames_file, "class names") if classnames_file is not None else None
        if not class_dirs:
            loose = _images_in(self.root)
            given = given if given is not None else (list(names) if names else None)
            if loose and given is not None:  # unlabelled images + class names
                self.classes = []
                self.classnames = given
                self.samples = [(f, -1) for f in loose]
                self.labelled = False
                self._check_classes(given)
                self._screen()
                if not self.samples:
                    raise TvtoolError(f"{self.root}: no readable images")
                return
            hint = " (unlabelled images need --classnames FILE)" if loose else ""
            raise TvtoolError(
                f"{self.root}: no class folders (expected DIR/<class>/*.png|jpg){hint}"
            )
        self.classes = [d.name for d in class_dirs]
        self.labelled = True
        self.samples = []
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
        self._screen()
        left = {lab for _, lab in self.samples}
        empty = [c for i, c in enumerate(self.classes) if i not in left]
        if empty:
            raise TvtoolError(
                f"{self.root}: class folder(s) without readable images: {', '.join(empty[:5])}"
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

    def _open(self, ref: object):
        return _open_file(ref)


class Subset(torch.utils.data.Dataset):
    """`indices` of a folder with a transform: a map-style dataset of (image tensor, label)."""

    def __init__(self, folder: ImageSource, indices: Sequence[int], transform: Transform):
        self.folder, self.indices, self.transform = folder, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = self.indices[j]
        return self.transform(self.folder.load(i)), self.folder.samples[i][1]


def pair_classnames(classnames: Sequence[Path] | None, n: int) -> list[Path | None]:
    """`--classnames` files for `n` data sets: none, one for all, or one per set."""
    names = list(classnames or [])
    if len(names) not in (0, 1, n):
        raise TvtoolError(
            f"give one --classnames file for all --data sets or one per set ({n}), "
            f"not {len(names)}"
        )
    return names * n if len(names) == 1 else (names or [None] * n)


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


def train_transform(
    clip: LoadedClip,
    flip: bool = False,
    strong: bool = False,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] | None = None,
) -> Transform:
    """Few-shot augmentation: random resized crop (scale 0.8-1; 0.5-1 when strong; or `scale`,
    aspect `ratio` 0.9-1.1 unless given), optional horizontal flip, colour jitter when strong;
    then normalise like `eval_transform`."""
    from torchvision import transforms as T

    steps: list = [
        T.RandomResizedCrop(
            clip.image_size,
            scale=scale or ((0.5, 1.0) if strong else (0.8, 1.0)),
            ratio=ratio or (0.9, 1.1),
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
    folder: ImageSource, indices: Sequence[int], transform: Transform
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a small set: (images [N, 3, H, W], labels [N] long)."""
    if not indices:
        raise TvtoolError(f"{folder.root}: no images selected")
    imgs = [transform(folder.load(i)) for i in indices]
    labels = torch.tensor([folder.samples[i][1] for i in indices], dtype=torch.long)
    return torch.stack(imgs), labels


def iter_batches(
    folder: ImageSource, indices: Sequence[int] | None, transform: Transform, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images, labels) over `indices` (default: all) in order, decoded as they go."""
    if batch_size < 1:
        raise TvtoolError(f"--batch-size must be >= 1 (got {batch_size})")
    idx = list(range(len(folder))) if indices is None else list(indices)
    for s in range(0, len(idx), batch_size):
        yield load_tensors(folder, idx[s : s + batch_size], transform)
