"""`--data VALUE` -> an image source: folder, Hugging Face data on disk or CSV; built-in names.

VALUE is ``PATH`` or ``NAME=PATH`` (NAME a built-in data set, `tvtool datasets ls`). PATH is an
image folder (``DIR/<class>/*.png``, or ``DIR/<split>/<class>/...``), a Hugging Face
``save_to_disk`` folder, a ``.parquet`` file or a folder of ``<split>-*.parquet`` files, or a
``.csv`` file of ``path,label`` rows. With NAME the published class names (matched to the data's
classes, see registry.py) and prompt templates of that data set are used; a `--classnames FILE`
still wins for the names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tvtool.datasets.images import ImageFolder, ImageSource, pair_classnames
from tvtool.datasets.registry import BuiltinDataset, get, match_classnames, parse_data_arg
from tvtool.errors import TvtoolError


def _open_path(path: Path, split: str | None, names: Sequence[str] | None, cache: bool):
    from tvtool.datasets import tables

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return tables.CSVImages(path, cache)
        if suffix == ".parquet":
            return tables.HFImages(path, split, cache)
        raise TvtoolError(f"{path}: unsupported data file (use a folder, .csv or .parquet)")
    if path.is_dir() and tables.is_hf_dir(path):
        return tables.HFImages(path, split, cache)
    return ImageFolder(path, split, None, cache, names=names)


def _names_file(src: ImageSource, classnames_file: Path) -> None:
    from tvtool.datasets.templates import read_lines

    given = read_lines(classnames_file, "class names")
    if src.labelled and len(given) != len(src.classes):
        raise TvtoolError(
            f"{classnames_file} lists {len(given)} class names but {src.root} has "
            f"{len(src.classes)} classes"
        )
    src.classnames = given
    src._check_classes(given)


def apply_dataset(src: ImageSource, d: BuiltinDataset, names_given: bool) -> None:
    """Name `src` after built-in data set `d`, with its templates and (unless a names file was
    given) its published class names in the data's class order."""
    src.name, src.dataset, src.templates = d.name, d.name, list(d.templates)
    if names_given:
        return
    if not src.labelled:
        if d.classnames is None:
            raise TvtoolError(
                f"{src.root}: unlabelled data, and {d.name!r} takes its class names from the "
                "data; give --classnames FILE"
            )
        src.classnames = list(d.classnames)
        return
    src.classnames, how = match_classnames(d, src.classes, str(src.root))
    if how == "position":
        sys.stderr.write(
            f"warning: {src.root}: its class labels are not {d.name}'s names; matched by "
            f"position ({src.classes[0]!r} -> {src.classnames[0]!r}, ...)\n"
        )
    src._check_classes(src.classnames)


def open_source(
    value: str | Path,
    split: str | None = None,
    classnames_file: Path | None = None,
    cache: bool = False,
    dataset: str | BuiltinDataset | None = None,
) -> ImageSource:
    """One data source for a `--data`/`--val`/`--negate` value (see the module docstring);
    `dataset` names the built-in data set when VALUE has no ``NAME=`` (a `--val` of a named
    `--data`)."""
    d, path = parse_data_arg(value)
    if d is None and dataset is not None:
        d = get(dataset) if isinstance(dataset, str) else dataset
    names = d.classnames if d is not None and classnames_file is None else None
    if not path.exists():
        raise TvtoolError(f"data not found: {path}")
    if classnames_file is not None and path.is_dir() and not _is_table(path):
        src: ImageSource = ImageFolder(path, split, classnames_file, cache)
    else:
        src = _open_path(path, split, names, cache)
        if classnames_file is not None:
            _names_file(src, classnames_file)
    if d is not None:
        apply_dataset(src, d, classnames_file is not None)
    if not src.labelled and not src.classnames:
        raise TvtoolError(f"{src.root}: unlabelled data needs class names (--classnames FILE)")
    return src


def open_folders(
    data: Sequence[str | Path],
    split: str | None,
    classnames: Sequence[Path] | None = None,
    cache: bool = False,
    datasets: Sequence[object] | None = None,
) -> list[ImageSource]:
    """One data source per `--data` value (folder, HF data, CSV; ``NAME=PATH`` for built-in
    names); class-name files one-for-all or one per value; `datasets` (one per value, None
    allowed) names the built-in data set of values without ``NAME=``."""
    if not data:
        raise TvtoolError("give at least one --data DIR")
    files = pair_classnames(classnames, len(data))
    named = list(datasets) if datasets is not None else [None] * len(data)
    return [
        open_source(d, split, f, cache, n)  # type: ignore[arg-type]
        for d, f, n in zip(data, files, named, strict=True)
    ]


def _is_table(path: Path) -> bool:
    from tvtool.datasets.tables import is_hf_dir

    return is_hf_dir(path)


def dataset_of(value: str | Path) -> BuiltinDataset | None:
    """The built-in data set a ``NAME=PATH`` value names (None for a plain path)."""
    return parse_data_arg(value)[0]


def has_split(value: str | Path, split: str) -> bool:
    """Whether `--data VALUE` holds a split of that name (an image folder's DIR/<split>, a
    Hugging Face DatasetDict split or ``<split>-*.parquet`` files; `val` also finds
    `validation`). A single file (CSV, parquet) has no splits."""
    from tvtool.datasets import tables

    path = parse_data_arg(value)[1]
    if not path.is_dir():
        return False
    if (path / split).is_dir():
        return True
    if not tables.is_hf_dir(path):
        return False
    names = tables.split_names(path)
    return any(s in names for s in tables.SPLIT_ALIASES.get(split, (split,)))
