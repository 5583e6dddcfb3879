"""Data beyond image folders: Hugging Face data on disk (save_to_disk, parquet) and CSV files;
built-in names applied to each (`--data NAME=PATH`)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tvtool.datasets import registry
from tvtool.datasets.sources import open_source
from tvtool.errors import TvtoolError


def _png(rng, size=12) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _hf_rows(n_per_class=3, classes=("cat", "dog", "frog"), seed=0, broken=0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(len(classes)):
        for _ in range(n_per_class):
            images.append({"bytes": _png(rng), "path": None})
            labels.append(c)
    for i in range(broken):  # unreadable image bytes
        images[i] = {"bytes": b"not an image", "path": None}
    return images, labels


def _hf_dataset(classes=("cat", "dog", "frog"), **kw):
    datasets = pytest.importorskip("datasets")
    images, labels = _hf_rows(classes=classes, **kw)
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train": _hf_dataset(seed=1), "test": _hf_dataset(seed=2, n_per_class=2)}
    )
    dd.save_to_disk(str(tmp_path / "pets"))
    tr = open_source(tmp_path / "pets", "train")
    te = open_source(tmp_path / "pets", "test")
    assert (len(tr), len(te)) == (9, 6)
    assert tr.classes == ["cat", "dog", "frog"] and tr.classnames == tr.classes
    assert tr.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the decoded pixels are the stored ones
    want = np.asarray(dd["test"].cast_column("image", datasets.Image())[4]["image"].convert("RGB"))
    assert (np.asarray(te.load(4)) == want).all()
    with pytest.raises(TvtoolError, match="no split 'val' among train, test"):
        open_source(tmp_path / "pets", "val")
    from tvtool.datasets.sources import has_split

    assert has_split(tmp_path / "pets", "test") and not has_split(tmp_path / "pets", "val")
    assert has_split(f"pets={tmp_path / 'pets'}", "train")
    datasets.DatasetDict({"validation": dd["test"]}).save_to_disk(str(tmp_path / "v"))
    assert has_split(tmp_path / "v", "val") and len(open_source(tmp_path / "v", "val")) == 6


def test_single_dataset_and_parquet_hub_layout(tmp_path, capsys):
    ds = _hf_dataset(broken=2)
    ds.save_to_disk(str(tmp_path / "one"))
    src = open_source(tmp_path / "one", "train")  # a single Dataset: the split name is moot
    assert len(src) == 7 and "skipped 2 unreadable image(s)" in capsys.readouterr().err
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    _hf_dataset(seed=3).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    _hf_dataset(seed=4, n_per_class=1).to_parquet(str(hub / "test-00000-of-00001.parquet"))
    _hf_dataset(seed=5, n_per_class=1).to_parquet(str(hub / "test-00001-of-00002.parquet"))
    (hub / "test-00000-of-00001.parquet").rename(hub / "test-00000-of-00002.parquet")
    te = open_source(tmp_path / "hub", "test")  # both shards of the split
    assert len(te) == 6 and te.classes == ["cat", "dog", "frog"]  # ClassLabel kept in parquet
    assert te.labels == [0, 1, 2, 0, 1, 2]
    one = open_source(hub / "train-00000-of-00001.parquet")
    assert len(one) == 9 and one.name == "train-00000-of-00001"


def test_hf_string_labels_and_builtin_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, labels = _hf_rows(classes=("a", "b"))
    names = ["9", "0"]  # CIFAR-10 class indices as strings
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [names[i] for i in labels]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "c10"))
    src = open_source(f"cifar10={tmp_path / 'c10'}")
    assert src.classes == [str(i) for i in range(10)]  # integer labels: class indices
    assert src.classnames == registry.get("cifar10").classnames
    assert src.labels == [9, 9, 9, 0, 0, 0]
    assert src.templates == registry.get("cifar10").templates and src.name == "cifar10"


def test_builtin_names_on_a_classlabel_in_hf_order(tmp_path):
    """FusionBench-style data: ClassLabel names are the data set's; matched by name."""
    pytest.importorskip("datasets")
    eurosat = registry.get("eurosat").classnames
    _hf_dataset(classes=tuple(eurosat[:2]) + (eurosat[5],)).save_to_disk(str(tmp_path / "eu"))
    src = open_source(f"eurosat={tmp_path / 'eu'}")  # a subset of the classes, by name
    assert src.classnames == [eurosat[0], eurosat[1], eurosat[5]]
    _hf_dataset(classes=("x", "y", "z")).save_to_disk(str(tmp_path / "xyz"))
    with pytest.raises(TvtoolError, match="3 classes, but data set 'eurosat' has 10"):
        open_source(f"eurosat={tmp_path / 'xyz'}")
    dd = registry.get("dtd").classnames
    _hf_dataset(classes=(dd[3], dd[0], dd[1])).save_to_disk(str(tmp_path / "dtd"))
    src = open_source(f"dtd={tmp_path / 'dtd'}")
    assert src.classnames == [dd[3], dd[0], dd[1]] and src.dataset == "dtd"


def test_hf_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "text"))
    with pytest.raises(TvtoolError, match="no image column"):
        open_source(tmp_path / "text")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{not json")
    with pytest.raises(TvtoolError, match="cannot read Hugging Face data set"):
        open_source(tmp_path / "broken")


def test_missing_datasets_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(TvtoolError, match=r"needs the `datasets` package: pip install 'tvtool"):
        open_source(tmp_path / "x.parquet")


def _csv_images(tmp_path, rows, header=True):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = ["path,label"] if header else []
    for i, lab in enumerate(rows):
        p = tmp_path / "img" / f"{i}.png"
        p.write_bytes(_png(rng))
        lines.append(f"img/{i}.png,{lab}")
    return lines


def test_csv_string_and_integer_labels(tmp_path, capsys):
    lines = _csv_images(tmp_path, ["dog", "cat", "dog", "cat"])
    lines.append("img/missing.png,cat")  # unreadable: skipped and counted
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    src = open_source(tmp_path / "a.csv")
    assert src.classes == ["cat", "dog"] and src.labels == [1, 0, 1, 0] and len(src) == 4
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    assert src.load(0).size == (12, 12)
    (tmp_path / "b.csv").write_text("\n".join(_csv_images(tmp_path, [0, 2, 1], header=False)))
    src = open_source(f"mnist={tmp_path / 'b.csv'}")
    assert src.classes == ["0", "1", "2"] and src.classnames == ["0", "1", "2"]
    assert src.templates == ['a photo of the number: "{}".']


def test_csv_unlabelled_with_builtin_names_and_errors(tmp_path):
    (tmp_path / "u.csv").write_text("\n".join(_csv_images(tmp_path, ["", "", ""])) + "\n")
    with pytest.raises(TvtoolError, match="unlabelled data needs class names"):
        open_source(tmp_path / "u.csv")
    src = open_source(f"svhn={tmp_path / 'u.csv'}")
    assert not src.labelled and src.classnames == [str(i) for i in range(10)]
    (tmp_path / "mixed.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png,\n")
    with pytest.raises(TvtoolError, match="some labels are empty"):
        open_source(tmp_path / "mixed.csv")
    (tmp_path / "short.csv").write_text("path,label\nimg/0.png\n")
    with pytest.raises(TvtoolError, match=r"short.csv:2: expected path,label"):
        open_source(tmp_path / "short.csv")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TvtoolError, match="unsupported data file"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(TvtoolError, match="data not found"):
        open_source(f"cars={tmp_path / 'nope'}")


def test_folder_with_builtin_names(tmp_path, capsys):
    from tests.test_data import make_folder

    make_folder(tmp_path / "c10", classes=("truck", "airplane_", "cat"), n=2)
    src = open_source(f"cifar10={tmp_path / 'c10'}")
    assert src.classes == ["airplane_", "cat", "truck"]
    assert src.classnames == ["airplane", "cat", "truck"]
    eu = registry.get("eurosat")
    folders = [f"c{i}" for i in range(10)]
    make_folder(tmp_path / "eu", classes=folders, n=1)
    src = open_source(f"eurosat={tmp_path / 'eu'}")
    assert src.classnames == eu.classnames
    assert "matched by position" in capsys.readouterr().err


def test_val_inherits_the_named_dataset_and_data_specs(tmp_path):
    from tests.test_data import make_folder
    from tvtool.compose.prepare import data_specs

    make_folder(tmp_path / "tr", classes=("truck", "cat"), n=2)
    make_folder(tmp_path / "va", classes=("truck", "cat"), n=1, seed=1)
    specs = data_specs([f"cifar10={tmp_path / 'tr'}"], [tmp_path / "va"], None,
                       negate=f"mnist={tmp_path / 'tr'}")
    assert [s.role for s in specs] == ["task", "target"]
    tr = open_source(specs[0].path, "train")
    va = open_source(specs[0].val, "val", dataset=tr.dataset)
    assert va.dataset == "cifar10" and va.classnames == tr.classnames == ["cat", "truck"]
    assert va.templates == tr.templates == registry.get("cifar10").templates
    with pytest.raises(TvtoolError, match="give one --val DIR per --data"):
        data_specs([tmp_path / "tr"], [tmp_path / "va", tmp_path / "va"])


def test_hf_unlabelled_and_classnames_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, _ = _hf_rows(n_per_class=1)
    ds = datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Image()})
    )
    ds.save_to_disk(str(tmp_path / "u"))
    with pytest.raises(TvtoolError, match="unlabelled data needs class names"):
        open_source(tmp_path / "u")
    src = open_source(f"gtsrb={tmp_path / 'u'}")  # for the unsupervised objectives
    assert not src.labelled and src.labels == [-1, -1, -1]
    assert src.classnames == registry.get("gtsrb").classnames
    _hf_dataset().save_to_disk(str(tmp_path / "l"))
    names = tmp_path / "names.txt"
    names.write_text("a cat\na dog\na frog\n")
    src = open_source(tmp_path / "l", classnames_file=names)
    assert src.classnames == ["a cat", "a dog", "a frog"]
    src = open_source(f"cifar10={tmp_path / 'l'}", classnames_file=names)  # the file wins
    assert src.classnames == ["a cat", "a dog", "a frog"] and src.dataset == "cifar10"
    names.write_text("x\ny\n")
    with pytest.raises(TvtoolError, match="lists 2 class names but .* has 3 classes"):
        open_source(tmp_path / "l", classnames_file=names)
