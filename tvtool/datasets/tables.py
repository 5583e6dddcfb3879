"""Data sets as tables: Hugging Face `datasets` on disk and CSV files of ``path,label``.

Hugging Face: a ``save_to_disk`` folder (one Dataset, or a DatasetDict whose split is chosen by
name), a ``.parquet`` file, or a folder of parquet files named ``<split>-*.parquet`` (the hub
layout FusionBench's data sets use, e.g. ``data/train-00000-of-00001.parquet``). The image column
is the first ``Image`` feature; the label column the first ``ClassLabel`` feature (its names are
the classes), else a column called ``label``/``labels`` of integers or strings; none: unlabelled.
The `datasets` package is optional (``pip install 'tvtool[hf]'``) and imported only here.

CSV: a header row naming ``path`` and ``label`` columns (else the first two columns are path and
label); paths relative to the CSV's folder. Integer labels are class indices (classes "0".."C-1"),
other labels class names (classes sorted, as for folders); empty labels: unlabelled.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from tvtool.datasets.images import ImageSource, _open_file
from tvtool.errors import TvtoolError

SPLIT_ALIASES = {"val": ("val", "validation", "valid"), "test": ("test",), "train": ("train",)}
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise TvtoolError(
            "reading Hugging Face data sets needs the `datasets` package: "
            "pip install 'tvtool[hf]'"
        ) from None
    datasets.disable_progress_bars()  # progress is for people; tvtool reports its own
    return datasets


def is_hf_dir(p: Path) -> bool:
    return (
        (p / "dataset_dict.json").is_file()
        or (p / "state.json").is_file()
        or any(p.glob("*.parquet"))
        or any(p.glob("*/*.parquet"))
    )


def _pick(splits: Sequence[str], split: str | None, where: Path) -> str:
    if split:
        for s in SPLIT_ALIASES.get(split, (split,)):
            if s in splits:
                return s
    if len(splits) == 1:
        return splits[0]
    raise TvtoolError(
        f"{where}: no split {split!r} among {', '.join(splits)} (name the split's file or folder)"
    )


def split_names(path: Path) -> list[str]:
    """The split names of a Hugging Face folder (a single Dataset has none)."""
    import json

    dd = path / "dataset_dict.json"
    if dd.is_file():
        try:
            return list(json.loads(dd.read_text(encoding="utf-8")).get("splits", []))
        except (OSError, ValueError, AttributeError):
            return []
    if (path / "state.json").is_file():
        return []
    return list(_parquet_splits(path))


def _from_parquet(files: Sequence[str | Path]):
    """A Dataset over parquet files read with pyarrow (memory-mapped), features (ClassLabel
    names) from the schema metadata `datasets` writes; nothing is written to the HF cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.table import InMemoryTable

    tables = [pq.read_table(str(f), memory_map=True) for f in files]
    table = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
    return Dataset(InMemoryTable(table))


def _parquet_splits(p: Path) -> dict[str, list[str]]:
    files = sorted(p.glob("*.parquet")) or sorted(p.glob("*/*.parquet"))
    out: dict[str, list[str]] = {}
    for f in files:
        out.setdefault(f.name.split("-")[0].split(".")[0], []).append(str(f))
    return out


def load_table(path: Path, split: str | None):
    """(datasets.Dataset, split name or None) for a save_to_disk folder or parquet data."""
    ds_mod = _require_datasets()
    try:
        if path.is_file():
            return _from_parquet([path]), None
        if split and (path / split / "state.json").is_file():
            return ds_mod.load_from_disk(str(path / split)), split
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            d = ds_mod.load_from_disk(str(path))
            if isinstance(d, ds_mod.DatasetDict):
                s = _pick(list(d), split, path)
                return d[s], s
            return d, None
        by_split = _parquet_splits(path)
        s = _pick(list(by_split), split, path)
        return _from_parquet(by_split[s]), s
    except TvtoolError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types for damaged data
        raise TvtoolError(f"cannot read Hugging Face data set {path}: {e}") from None


class HFImages(ImageSource):
    """Rows of a Hugging Face data set; images decoded by PIL on demand (never by `datasets`)."""

    def __init__(self, path: str | Path, split: str | None = None, cache: bool = False):
        ds_mod = _require_datasets()
        super().__init__(cache)
        self.root = Path(path).expanduser()
        if not self.root.exists():
            raise TvtoolError(f"data not found: {self.root}")
        ds, chosen = load_table(self.root, split)
        self.name = (self.root.stem if self.root.is_file() else self.root.resolve().name)
        feats = ds.features
        img = next((k for k, f in feats.items() if isinstance(f, ds_mod.Image)), None)
        if img is None:
            raise TvtoolError(
                f"{self.root}: no image column (an `Image` feature) among {list(feats)}"
            )
        lab = next((k for k, f in feats.items() if isinstance(f, ds_mod.ClassLabel)), None)
        lab = lab or next((c for c in LABEL_COLUMNS if c in feats), None)
        self._ds = ds.cast_column(img, ds_mod.Image(decode=False))
        self._img = img
        self.split = chosen
        if lab is None:
            self.classes, self.labelled = [], False
            self.samples = [(i, -1) for i in range(len(ds))]
        elif isinstance(feats[lab], ds_mod.ClassLabel):
            self.classes, self.labelled = list(feats[lab].names), True
            self.samples = list(enumerate(int(v) for v in ds[lab]))
        else:
            self.classes, labels = _classes_of([v for v in ds[lab]], str(self.root))
            self.labelled = True
            self.samples = list(enumerate(labels))
        if not self.samples:
            raise TvtoolError(f"{self.root}: no rows")
        self._screen()
        if not self.samples:
            raise TvtoolError(f"{self.root}: no readable images")
        self.classnames = [c.replace("_", " ") for c in self.classes]

    def _open(self, ref: object):
        cell = self._ds[int(ref)][self._img]  # type: ignore[call-overload]
        if cell.get("bytes"):
            return _open_file(io.BytesIO(cell["bytes"]))
        if cell.get("path"):
            return _open_file(cell["path"])
        raise OSError("empty image cell")

    def _describe(self, ref: object) -> str:
        return f"row {ref} of {self.root}"


def _classes_of(values: list, where: str) -> tuple[list[str], list[int]]:
    """(classes, label per value): integers are indices, anything else a class name."""
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        raise TvtoolError(f"{where}: some labels are empty (label all rows or none)")
    try:
        ints = [int(v) for v in values]
        if all(str(v).strip().lstrip("-").isdigit() for v in values):
            if min(ints) < 0:
                raise TvtoolError(f"{where}: negative class index {min(ints)}")
            return [str(i) for i in range(max(ints) + 1)], ints
    except (TypeError, ValueError):
        pass
    names = sorted({str(v).strip() for v in values})
    index = {n: i for i, n in enumerate(names)}
    return names, [index[str(v).strip()] for v in values]


class CSVImages(ImageSource):
    """Images listed in a CSV of ``path,label`` rows."""

    def __init__(self, path: str | Path, cache: bool = False):
        super().__init__(cache)
        self.root = Path(path).expanduser()
        self.name = self.root.stem
        try:
            with self.root.open(newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise TvtoolError(f"cannot read CSV {self.root}: {e}") from None
        if not rows:
            raise TvtoolError(f"{self.root}: empty CSV")
        head = [c.strip().lower() for c in rows[0]]
        if "path" in head:
            pi, li = head.index("path"), (head.index("label") if "label" in head else None)
            rows = rows[1:]
        else:
            pi, li = 0, (1 if len(rows[0]) > 1 else None)
        base = self.root.parent
        paths, labels = [], []
        for n, r in enumerate(rows, start=2 if "path" in head else 1):
            if len(r) <= pi or (li is not None and len(r) <= li):
                raise TvtoolError(f"{self.root}:{n}: expected path,label")
            p = Path(r[pi].strip()).expanduser()
            paths.append(p if p.is_absolute() else base / p)
            labels.append(r[li].strip() if li is not None else "")
        if not paths:
            raise TvtoolError(f"{self.root}: no rows")
        if all(not v for v in labels):
            self.classes, self.labelled = [], False
            self.samples = [(p, -1) for p in paths]
        else:
            self.classes, ids = _classes_of(labels, str(self.root))
            self.labelled = True
            self.samples = list(zip(paths, ids, strict=True))
        self._screen()
        if not self.samples:
            raise TvtoolError(f"{self.root}: no readable images")
        self.classnames = [c.replace("_", " ") for c in self.classes]

    def _open(self, ref: object):
        return _open_file(ref)
