"""The example zoo: deterministic domains and splits, files that open_clip and tvtool load."""

from __future__ import annotations

import json

import pytest
import torch

from tvtool.demo import domains as dm
from tvtool.demo.data import SPLITS, read_image_folder, render, split_indices
from tvtool.demo.recipe import Splits, recipe_for
from tvtool.errors import TvtoolError


@pytest.fixture(scope="module")
def digits():
    return dm.load_digits_grey(16)


def test_splits_are_disjoint_stratified_and_seeded(digits):
    _, labels = digits
    a = split_indices(labels, Splits(), seed=0)
    b = split_indices(labels, Splits(), seed=0)
    c = split_indices(labels, Splits(), seed=1)
    assert all(torch.equal(a[s], b[s]) for s in SPLITS)
    assert any(not torch.equal(a[s], c[s]) for s in SPLITS)
    every = torch.cat([a[s] for s in SPLITS])
    assert len(every) == len(labels) == len(set(every.tolist()))  # disjoint and complete
    for s in SPLITS:  # every class in every split, in about the recipe's proportion
        counts = torch.bincount(labels[a[s]], minlength=10)
        assert counts.min() > 0
    assert abs(len(a["train"]) / len(labels) - Splits().train) < 0.01


def test_domains_are_fixed_functions_of_the_digit(digits):
    grey, _ = digits
    idx = torch.arange(40)
    for d in dm.DOMAINS:
        x = dm.apply_domain(d, grey[:40], idx)
        assert x.shape == (40, 3, 16, 16) and x.min() >= 0 and x.max() <= 1
        assert torch.equal(x, dm.apply_domain(d, grey[:40], idx))
    # noise is keyed by the digit's index, not by its position in a batch
    one = dm.apply_domain("noise", grey[7:8], torch.tensor([7]))
    assert torch.equal(one[0], dm.apply_domain("noise", grey[:40], idx)[7])
    # held-out targets are two task domains' changes at once
    edge = dm.apply_domain("edge", grey[:40], idx)
    assert torch.allclose(dm.apply_domain("inv_edge", grey[:40], idx), 1 - edge)
    inv = dm.apply_domain("invert", grey[:40], idx)
    assert torch.allclose(inv, 1 - dm.apply_domain("original", grey[:40], idx))
    assert not torch.equal(dm.apply_domain("checker_inv", grey[:40], idx), inv)


def test_render_is_deterministic():
    a = render(["original", "edge"], ["original"], Splits(), 3, 16)
    b = render(["original", "edge"], ["original"], Splits(), 3, 16)
    assert set(a["original"]) == set(SPLITS) and "pretrain" not in a["edge"]
    for d in a:
        for s in a[d]:
            assert torch.equal(a[d][s].images, b[d][s].images)
            assert a[d][s].images.dtype == torch.uint8


@pytest.mark.slow
def test_zoo_layout_and_recipe(small_zoo):
    z = small_zoo
    r = recipe_for("small", 0)
    info = json.loads((z.root / "zoo.json").read_text())
    assert info["recipe_hash"] == r.digest()
    assert set(info["finetuned"]) == set(r.task_domains) == set(info["attention"])
    assert len(r.target_domains) >= 2 and not set(r.target_domains) & set(r.task_domains)
    for d in r.all_domains:
        for s in ("train", "val", "test"):
            classes = sorted(p.name for p in z.data(d, s).iterdir())
            assert classes == sorted(dm.CLASSNAMES)
    assert z.data("original", "pretrain").is_dir()
    assert z.templates.read_text().splitlines() == r.templates
    # fine-tuning helped on every task domain (the zoo records its own test accuracies)
    for d in r.task_domains:
        assert info["accuracy"][d]["finetuned"] > info["accuracy"][d]["zeroshot"] + 10


@pytest.mark.slow
def test_png_folders_hold_the_rendered_images(small_zoo):
    r = small_zoo.recipe
    sets = render(["checker_inv"], r.pretrain_domains, r.splits, r.seed, r.model.image_size)
    images, labels = read_image_folder(small_zoo.data("checker_inv", "val"))
    want = sets["checker_inv"]["val"]
    order = torch.argsort(want.labels, stable=True)  # folders are read class by class
    assert torch.equal(labels, want.labels[order])
    assert torch.equal(images, want.images[order])


@pytest.mark.slow
def test_checkpoints_load_with_open_clip(small_zoo):
    import open_clip
    from safetensors.torch import load_file

    from tvtool.demo.train import register_config

    z = small_zoo
    name = register_config(z.model_config)
    assert name == z.info.model_name
    model = open_clip.create_model(name, pretrained=None)
    base = load_file(str(z.zeroshot))
    model.load_state_dict(base)  # strict: every key, every shape
    for d in z.recipe.task_domains:
        ft = load_file(str(z.finetuned(d)))
        assert list(ft) == list(base)
        changed = {k for k in base if not torch.equal(base[k], ft[k])}
        assert changed and all(k.startswith("visual.") for k in changed)
        assert any("mlp" in k for k in changed)
        # the attention-only fine-tune changed every attention linear layer and nothing else
        attn = load_file(str(z.attention(d)))
        model.load_state_dict(attn)
        changed = {k for k in base if not torch.equal(base[k], attn[k])}
        assert changed == _attention_keys(model)


def _attention_keys(model) -> set[str]:
    """The in_proj / out_proj parameters of the image tower's nn.MultiheadAttention modules."""
    keys = set()
    for name, mod in model.visual.named_modules():
        if isinstance(mod, torch.nn.MultiheadAttention):
            for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                keys.add(f"visual.{name}.{p}")
    return keys


def test_attention_filter_matches_the_attention_modules(tmp_path):
    """`is_attention` picks exactly the image tower's attention linear layers."""
    import open_clip

    from tvtool.demo.train import create_model, is_attention

    r = recipe_for("small", 0)
    cfg = tmp_path / f"{r.model.name}.json"
    cfg.write_text(json.dumps(r.model.open_clip_config()))
    model = create_model(cfg)
    assert isinstance(model, open_clip.CLIP)
    names = {f"visual.{n}" for n, _ in model.visual.named_parameters()}
    picked = {n for n in names if is_attention(n)}
    assert picked == _attention_keys(model) and len(picked) == 4 * r.model.layers


@pytest.mark.slow
def test_zoo_and_tvtool_preprocess_the_same_way(small_zoo):
    """The zoo trains on what `tvtool eval` feeds the model: its PNGs through open_clip's
    eval transform."""
    import numpy as np
    from PIL import Image

    from tvtool.datasets import images as mdata
    from tvtool.demo.train import normaliser
    from tvtool.models.build import load_clip

    z = small_zoo
    clip = load_clip(model_config=z.model_config, base=z.zeroshot, device="cpu")
    folder = mdata.ImageFolder(z.data("edge", "test"))
    x, _ = mdata.load_tensors(folder, list(range(8)), mdata.eval_transform(clip))
    raw = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p, _ in folder.samples[:8]])
    assert torch.allclose(x, normaliser(clip.model)(raw), atol=1e-5)


@pytest.mark.slow
def test_second_build_reuses_everything(small_zoo, tmp_path):
    from tvtool.demo.zoo import build_zoo

    z = small_zoo
    before = {p: p.stat().st_mtime_ns for p in (z.root / "models").rglob("*.safetensors")}
    again = build_zoo(z.root, seed=0, size="small")
    assert {"data", "pretrain"} <= set(again.reused)
    assert all(f"finetune:{d}" in again.reused for d in z.recipe.task_domains)
    assert all(f"attention:{d}" in again.reused for d in z.recipe.task_domains)
    after = {p: p.stat().st_mtime_ns for p in (z.root / "models").rglob("*.safetensors")}
    assert before == after
    with pytest.raises(TvtoolError, match="another recipe"):
        build_zoo(z.root, seed=1, size="small")
    (tmp_path / "mine.txt").write_text("not a zoo")
    with pytest.raises(TvtoolError, match="not empty"):
        build_zoo(tmp_path, seed=0, size="small")


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    """A micro recipe built twice gives byte-identical checkpoints."""
    from tvtool.demo.zoo import build_zoo

    r = recipe_for("small", 5)
    r = r.model_copy(
        update={
            "task_domains": ["invert"],
            "target_domains": ["inv_edge"],
            "pretrain_domains": ["original"],
            "pretrain": r.pretrain.model_copy(update={"epochs": 1}),
            "finetune": r.finetune.model_copy(update={"epochs": 1}),
            "attention_finetune": r.finetune.model_copy(update={"epochs": 1}),
        }
    )
    a = build_zoo(tmp_path / "a", recipe=r)
    b = build_zoo(tmp_path / "b", recipe=r)
    models = ("zeroshot", "invert/finetuned", "invert/attention")
    for rel in (f"models/{m}.safetensors" for m in models):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()


@pytest.mark.slow
def test_demo_build_cli(small_zoo, invoke):
    res = invoke("demo", "build", "--out", small_zoo.root, "--small", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["recipe"]["size"] == "small" and "pretrain" in doc["reused"]
    res = invoke("demo", "build", "--out", small_zoo.root, "--seed", "3", "--small")
    assert res.exit_code == 1 and "another recipe" in res.stderr


def test_unknown_domain_is_a_user_error(digits):
    with pytest.raises(TvtoolError, match="unknown zoo domain"):
        dm.apply_domain("sepia", digits[0][:2], torch.arange(2))
