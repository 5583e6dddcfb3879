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


def _heads(store_root=None):
    from tvtool.store.store import Store
    from tvtool.vectors.stored import load_tensor_object

    st = Store(store_root)
    out = {}
    for ref, digest in st.refs().items():
        if ref.startswith("cache/heads/"):
            m, tensors = load_tensor_object(st, digest, "head")
            out[tuple(m.params["classnames"])] = (m.params["templates"], tensors["head"])
    return out


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
    assert any(tpl == ["a {} image"] for tpl, _ in _heads().values())
    # unsafe templates are refused in one line
    f.write_text("{}{0.__class__}\n")
    r = invoke(*_args(tiny, "--data", str(tiny["c10"]), "--templates", f))
    assert r.exit_code == 1 and "exactly one" in r.stderr and "Traceback" not in r.output
    r = invoke(*_args(tiny, "--data", f"carz={tiny['c10']}"))
    assert r.exit_code == 1 and "unknown data set 'carz'" in r.stderr
