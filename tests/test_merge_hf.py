"""`merge --out DIR` with an HF base folder: a folder transformers loads, with the logits of a
reference merge computed in memory (tiny random LlamaConfig models, tied embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tvtool.checkpoints.writer import save_safetensors  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
           tie_word_embeddings=True)


@pytest.fixture
def llamas(tmp_path: Path):
    """base/ (sharded, tied embeddings: every key under `model.`) and two fine-tunes."""
    cfg = LlamaConfig(**CFG)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    sds = [base.state_dict()]
    for i in (1, 2):
        ft = LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(i)
        ft.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g)
                            for k, v in base.state_dict().items()})
        ft.save_pretrained(tmp_path / f"ft{i}", max_shard_size="20KB")
        sds.append(ft.state_dict())
    return tmp_path, cfg, sds


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_folder_output_loads_in_transformers_with_the_reference_logits(invoke, llamas):
    tmp, cfg, (b, f1, f2) = llamas
    base_files = sorted(p.name for p in (tmp / "base").glob("*.safetensors"))
    assert len(base_files) > 1
    r = invoke("merge", "--base", tmp / "base", "--out", tmp / "merged", f"{tmp / 'ft1'}:0.5",
               f"{tmp / 'ft2'}:0.5", "-q")
    assert r.exit_code == 0, r.stderr
    out = tmp / "merged"
    assert sorted(p.name for p in out.glob("*.safetensors")) == base_files  # base's layout
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp / "base" / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((tmp / "base" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # keys exactly the base's
    assert index["metadata"]["tvtool.merge"] == r.stdout.strip()

    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = LlamaForCausalLM(cfg)
    ref.load_state_dict({k: b[k] + 0.5 * (f1[k] - b[k]) + 0.5 * (f2[k] - b[k]) for k in b})
    ids = torch.randint(0, CFG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(_logits(merged, ids), _logits(ref.eval(), ids), atol=1e-5)


def test_folder_with_other_weights_needs_force_then_stale_files_go(invoke, llamas):
    tmp, *_ = llamas
    out = tmp / "merged"
    out.mkdir()
    save_safetensors(out / "model-00009-of-00009.safetensors", {"x": torch.ones(2)})
    (out / "pytorch_model.bin.index.json").write_text("{}")
    args = ("merge", "--base", tmp / "base", "--out", out, f"{tmp / 'ft1'}:0.5", "-q")
    r = invoke(*args)
    assert r.exit_code == 1 and "--force" in r.stderr and "model-00009" in r.stderr
    r = invoke(*args, "--force")
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert "model-00009-of-00009.safetensors" not in names
    assert "pytorch_model.bin.index.json" not in names
    AutoModelForCausalLM.from_pretrained(out)  # loads: no stale index or shard left
    r = invoke("merge", "--base", tmp / "base", "--out", tmp / "one", f"{tmp / 'ft1'}:0.5",
               "--shard-size", "10GB", "-q")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp / "one").iterdir() if "safetensors" in p.name) == [
        "model.safetensors"]
    AutoModelForCausalLM.from_pretrained(tmp / "one")
