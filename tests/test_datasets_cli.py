"""Built-in data sets through the CLI: `--data NAME=PATH` gives each data set of one run its
published class names and templates (checked on the cached heads against open_clip directly)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_CLIP
from tests.test_data import make_folder
from tvtool.datasets import registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import open_clip

    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.models.build import register_config

    d = tmp_path_factory.mktemp("dscli")
    cfg = d / "tvtool-test-datasets.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    name, _ = register_config(cfg)
    torch.manual_seed(0)
    net = open_clip.create_model(name, pretrained=None).eval()
    save_safetensors(d / "base.safetensors", net.state_dict(), {})
    c10 = make_folder(d / "c10", classes=("truck", "airplane"), n=3, size=16)
    rng = np.random.default_rng(5)
    from PIL import Image

    (d / "digits").mkdir()
    rows = ["path,label"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            d / "digits" / f"{i}.png"
        )
        rows.append(f"digits/{i}.png,{i % 2}")
    (d / "digits.csv").write_text("\n".join(rows) + "\n")
    return {"dir": d, "cfg": cfg, "net": net, "name": name, "c10": c10, "csv": d / "digits.csv"}


def _args(t, *extra):
    return ["eval", "--model-config", t["cfg"], "--base", t["dir"] / "base.safetensors",
            "--device", "cpu", *extra]


def _plain_head(t, names, templates):
    import open_clip

    tok = open_clip.get_tokenizer(t["name"])
    with torch.no_grad():
        rows = []
        for c in names:
            prompts = tok([p.replace("{}", c) for p in templates])
            e = F.normalize(t["net"].encode_text(prompts), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def _all_heads(store_root=None):
    """Every cached head as (classnames, templates, head tensor)."""
    from tvtool.store.store import Store
    from tvtool.vectors.stored import load_tensor_object

    st = Store(store_root)
    out = []
    for ref, digest in sorted(st.refs().items()):
        if ref.startswith("cache/heads/"):
            m, tensors = load_tensor_object(st, digest, "head")
            out.append((tuple(m.params["classnames"]), m.params["templates"], tensors["head"]))
    return out


def _heads(store_root=None):
    """Cached heads by class names (use only while one head per class list is cached)."""
    return {names: (tpl, head) for names, tpl, head in _all_heads(store_root)}


@pytest.mark.slow
def test_eval_uses_each_datasets_names_and_templates(tiny, invoke, tmp_path):
    r = invoke(*_args(tiny, "--data", f"cifar10={tiny['c10']}", "--data", f"mnist={tiny['csv']}",
                      "--json"))
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert [d["dataset"] for d in rep["results"]] == ["cifar10", "mnist"]
    heads = _heads()
    c10_tpl, c10_head = heads[("airplane", "truck")]
    assert c10_tpl == registry.get("cifar10").templates
    mn_tpl, mn_head = heads[("0", "1")]
    assert mn_tpl == registry.get("mnist").templates
    torch.testing.assert_close(
        c10_head, _plain_head(tiny, ["airplane", "truck"], c10_tpl), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(mn_head, _plain_head(tiny, ["0", "1"], mn_tpl), atol=1e-5, rtol=1e-4)
    # an explicit --templates file wins for every data set
    f = tmp_path / "t.txt"
    f.write_text("a {} image\n")
    r = invoke(*_args(tiny, "--data", f"cifar10={tiny['c10']}", "--templates", f, "--json"))
    assert r.exit_code == 0, r.output
    assert any(tpl == ["a {} image"] for _, tpl, _ in _all_heads())
    # unsafe templates are refused in one line
    f.write_text("{}{0.__class__}\n")
    r = invoke(*_args(tiny, "--data", str(tiny["c10"]), "--templates", f))
    assert r.exit_code == 1 and "exactly one" in r.stderr and "Traceback" not in r.output
    r = invoke(*_args(tiny, "--data", f"carz={tiny['c10']}"))
    assert r.exit_code == 1 and "unknown data set 'carz'" in r.stderr


def _to_hf(folder, out):
    """An image folder rewritten as a Hugging Face save_to_disk data set (ClassLabel)."""
    datasets = pytest.importorskip("datasets")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    rows = {"image": [], "label": []}
    for c, name in enumerate(classes):
        for f in sorted((folder / name).glob("*.png")):
            rows["image"].append({"bytes": f.read_bytes(), "path": None})
            rows["label"].append(c)
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}
    )
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(out))
    return out


@pytest.mark.slow
def test_compose_on_hf_and_csv_data_with_builtin_names_and_val_split(assets, invoke, tmp_path):
    from tests.compose_assets import extract, model_args

    extract(assets, assets.ft_colors, "c")
    hf = _to_hf(assets.stripes, tmp_path / "stripes_hf")
    rows = ["path,label"] + [
        f"{f},{f.parent.name}" for f in sorted(assets.colors.glob("*/*.png"))
    ]
    (tmp_path / "colors.csv").write_text("\n".join(rows) + "\n")
    r = invoke("compose", "c", *model_args(assets), "--data", f"rendered_sst2={hf}",
               "--data", tmp_path / "colors.csv", "--val-split", "0.25", "--shots", "2",
               "--epochs", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert "matched by position" in r.stderr  # horizontal/vertical -> negative/positive
    data = json.loads(r.stdout)["data"]
    assert [d["name"] for d in data] == ["rendered_sst2", "colors"]
    assert data[0]["dataset"] == "rendered_sst2" and "dataset" not in data[1]
    assert data[0]["templates"] == 1 and "templates" not in data[1]
    assert [d["classes"] for d in data] == [2, 3]
    assert [d["train"] for d in data] == [4, 6]  # 2 shots per class
    assert [d["val"] for d in data] == [6, 9]  # 25% of 12 images per class held out first
    heads = _heads()
    assert heads[("negative", "positive")][0] == registry.get("rendered_sst2").templates
    assert ("blue", "green", "red") in heads  # CSV labels: sorted class names, default templates
