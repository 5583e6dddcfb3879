"""tvtool.datasets.images: image folders, few-shot sampling, validation splits, transforms."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tvtool.datasets import images as data
from tvtool.datasets import splits
from tvtool.errors import TvtoolError


def make_folder(root: Path, classes=("a_b", "c", "d"), n=6, size=16, seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.png")
    return root


def fake_clip(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=16):
    return SimpleNamespace(image_size=(size, size), mean=mean, std=std, interpolation="bilinear")


def test_folder_order_names_and_split(tmp_path):
    make_folder(tmp_path / "ds" / "test")
    (tmp_path / "ds" / "test" / "c" / "notes.txt").write_text("not an image")
    f = data.ImageFolder(tmp_path / "ds", split="test")
    assert f.root == tmp_path / "ds" / "test"
    assert f.name == "ds"
    assert f.classes == ["a_b", "c", "d"]
    assert f.classnames == ["a b", "c", "d"]
    assert len(f) == 18 and f.labels == [0] * 6 + [1] * 6 + [2] * 6
    assert [p.name for p, _ in f.samples[:3]] == ["00.png", "01.png", "02.png"]
    # no such split sub-folder: the directory itself holds the classes
    g = data.ImageFolder(tmp_path / "ds" / "test", split="train")
    assert g.root == tmp_path / "ds" / "test" and g.name == "test"
    assert f.load(0).mode == "RGB" and f.load(0).size == (16, 16)


def test_classnames_file(tmp_path):
    make_folder(tmp_path / "ds")
    names = tmp_path / "names.txt"
    names.write_text("first\nsecond\nthird\n")
    f = data.ImageFolder(tmp_path / "ds", classnames_file=names)
    assert f.classnames == ["first", "second", "third"]
    names.write_text("one\ntwo\n")
    with pytest.raises(TvtoolError, match="lists 2 class names but .* has 3 class folders"):
        data.ImageFolder(tmp_path / "ds", classnames_file=names)


def test_unlabelled_images_with_classnames(tmp_path):
    make_folder(tmp_path / "tmp")
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in sorted((tmp_path / "tmp" / "c").glob("*.png")):
        p.rename(loose / p.name)
    with pytest.raises(TvtoolError, match="need --classnames"):
        data.ImageFolder(loose)
    names = tmp_path / "n.txt"
    names.write_text("x\ny\n")
    f = data.ImageFolder(loose, classnames_file=names)
    assert not f.labelled and set(f.labels) == {-1} and len(f) == 6
    with pytest.raises(TvtoolError, match="labelled"):
        splits.few_shot_indices(f.labels, 1, 0)


def test_folder_errors(tmp_path):
    with pytest.raises(TvtoolError, match="data directory not found"):
        data.ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TvtoolError, match="no class folders"):
        data.ImageFolder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "b").mkdir(parents=True)
    with pytest.raises(TvtoolError, match="no images"):
        data.ImageFolder(tmp_path / "noimg")
    make_folder(tmp_path / "one", classes=("only",), n=3)
    with pytest.raises(TvtoolError, match="at least 2 classes, found 1"):
        data.ImageFolder(tmp_path / "one")
    make_folder(tmp_path / "partial", classes=("a", "b"), n=2)
    (tmp_path / "partial" / "c").mkdir()
    with pytest.raises(TvtoolError, match="without images: c"):
        data.ImageFolder(tmp_path / "partial")

def test_unreadable_images_are_skipped_with_a_count(tmp_path, capsys):
    bad = make_folder(tmp_path / "bad", classes=("a", "b"), n=3)
    (bad / "a" / "00.png").write_bytes(b"not a png")
    (bad / "b" / "01.png").write_bytes((bad / "b" / "01.png").read_bytes()[:20])  # cut header
    f = data.ImageFolder(bad)
    assert [p.name for p, _ in f.samples] == ["01.png", "02.png", "00.png", "02.png"]
    assert f.labels == [0, 0, 1, 1]
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    for i in range(len(f)):
        assert f.load(i).size == (16, 16)
    # a header that reads but data that does not decode fails at load time, with one line
    (bad / "a" / "01.png").write_bytes((bad / "a" / "01.png").read_bytes()[:60])
    g = data.ImageFolder(bad)
    with pytest.raises(TvtoolError, match="cannot read image"):
        g.load(0)
    for name in ("00", "01", "02"):
        (bad / "a" / f"{name}.png").write_bytes(b"junk")
    with pytest.raises(TvtoolError, match="class folder"):  # a class left without images
        data.ImageFolder(bad)


def test_decompression_bombs_are_skipped(tmp_path, capsys, monkeypatch):
    from PIL import Image

    root = make_folder(tmp_path / "bomb", classes=("a", "b"), n=2, size=16)
    Image.new("RGB", (40, 40)).save(root / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32)
    f = data.ImageFolder(root)
    assert len(f) == 4 and all(p.name != "big.png" for p, _ in f.samples)
    assert "larger than 1024 pixels" in capsys.readouterr().err


def test_few_shot_indices_are_seeded_and_per_class():
    labels = [0] * 10 + [1] * 7 + [2] * 5
    a = splits.few_shot_indices(labels, 4, seed=3)
    assert a == splits.few_shot_indices(labels, 4, seed=3)
    assert a != splits.few_shot_indices(labels, 4, seed=4)
    counts = np.bincount([labels[i] for i in a])
    assert counts.tolist() == [4, 4, 4]
    assert len(set(a)) == 12
    assert splits.few_shot_indices(labels, 5, seed=0)[-5:] == [17, 18, 19, 20, 21]  # whole class
    with pytest.raises(TvtoolError, match="--shots 6 is larger than class 'cars', which has 5"):
        splits.few_shot_indices(labels, 6, seed=0, classnames=["x", "y", "cars"])
    with pytest.raises(TvtoolError, match=">= 1"):
        splits.few_shot_indices(labels, 0, seed=0)


def test_split_val_is_stratified_and_disjoint():
    labels = [0] * 10 + [1] * 4 + [2] * 1
    idx = list(range(len(labels)))
    train, val = splits.split_val(labels, idx, 0.25, seed=0)
    assert sorted(train + val) == idx and not set(train) & set(val)
    assert np.bincount([labels[i] for i in val], minlength=3).tolist() == [2, 1, 0]
    assert (train, val) == splits.split_val(labels, idx, 0.25, seed=0)
    sub = [0, 2, 4, 6, 10, 11]
    tr, va = splits.split_val(labels, sub, 0.5, seed=1)
    assert sorted(tr + va) == sub
    with pytest.raises(TvtoolError, match="between 0 and 1"):
        splits.split_val(labels, idx, 1.0, seed=0)


def test_eval_transform_and_load_tensors(tmp_path):
    make_folder(tmp_path / "ds", n=3)
    f = data.ImageFolder(tmp_path / "ds")
    clip = fake_clip()
    x, y = data.load_tensors(f, [0, 4, 8], data.eval_transform(clip))
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 1, 2]
    raw = torch.from_numpy(np.array(f.load(4))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[1], (raw - 0.5) / 0.25)
    batches = list(data.iter_batches(f, None, data.eval_transform(clip), batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 1]
    assert torch.cat([b[1] for b in batches]).tolist() == f.labels
    with pytest.raises(TvtoolError, match="batch-size"):
        list(data.iter_batches(f, None, data.eval_transform(clip), batch_size=0))


def test_eval_transform_resizes_to_model_size(tmp_path):
    make_folder(tmp_path / "big", classes=("a", "b"), n=1, size=40)
    f = data.ImageFolder(tmp_path / "big")
    x, _ = data.load_tensors(f, [0, 1], data.eval_transform(fake_clip(size=16)))
    assert x.shape == (2, 3, 16, 16)


def test_train_transform_is_random_but_seedable(tmp_path):
    make_folder(tmp_path / "ds", classes=("a", "b"), n=1, size=24)
    f = data.ImageFolder(tmp_path / "ds", cache=True)
    tf = data.train_transform(fake_clip(), flip=True, strong=True)
    torch.manual_seed(0)
    a = tf(f.load(0))
    torch.manual_seed(0)
    b = tf(f.load(0))
    c = tf(f.load(0))
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert f.load(0) is f.load(0)  # cached decode
    ds = f.subset([1, 0], data.eval_transform(fake_clip()))
    img, label = ds[0]
    assert len(ds) == 2 and label == 1 and img.shape == (3, 16, 16)
