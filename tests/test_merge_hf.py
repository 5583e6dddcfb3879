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


def _config(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.yml"
    path.write_text(text)
    return path


def test_a_mergekit_config_means_what_it_means_to_mergekit(invoke, llamas):
    """A file in mergekit's spelling: linear (normalised weights), task_arithmetic with lambda,
    out_dtype; ties per tensor and dare_ties (density = keep probability, L1 rescale) give the
    same bytes as the equivalent command line; tokenizer_source is one line."""
    from safetensors.torch import load_file

    tmp, _, (b, f1, f2) = llamas
    models = (f"models:\n  - model: {tmp / 'ft1'}\n    parameters: {{weight: 1.0}}\n"
              f"  - model: {tmp / 'ft2'}\n    parameters: {{weight: 3.0}}\n")
    head = f"base_model: {tmp / 'base'}\n"

    def merged(name: str, text: str) -> dict[str, torch.Tensor]:
        out = tmp / f"{name}.safetensors"
        r = invoke("merge", "--config", _config(tmp, name, text), "--out", out, "-q")
        assert r.exit_code == 0, (name, r.stderr)
        return load_file(out)

    cases = {
        "linear": (head + "merge_method: linear\n" + models + "dtype: float32\n"
                   "out_dtype: bfloat16\n", 0.25, 0.75, torch.bfloat16),
        "ta": (head + "merge_method: task_arithmetic\nparameters: {lambda: 0.5}\n" + models,
               0.5, 1.5, torch.float32),
    }
    for name, (text, w1, w2, dtype) in cases.items():
        got = merged(name, text)
        assert set(got) == set(b) - {"lm_head.weight"}  # tied: the file has no lm_head
        for k, x in got.items():
            v = b[k]
            want = v + w1 * (f1[k] - v) + w2 * (f2[k] - v)
            assert x.dtype == dtype, name
            torch.testing.assert_close(x.float(), want.to(dtype).float(), rtol=0, atol=1e-6,
                                       msg=(name, k))
    same = {
        "ties": ("merge_method: ties\nparameters: {density: 0.5}\n",
                 ["--method", "ties", "--density", "0.5", "--ties-scope", "tensor"]),
        "dare": ("merge_method: dare_ties\nparameters: {density: 0.7}\n",
                 ["--method", "dare", "--drop", "0.3", "--rescale", "l1", "--then", "ties",
                  "--ties-scope", "tensor"]),
    }
    for name, (text, flags) in same.items():
        got = merged(name, head + text + models)
        cli = tmp / f"{name}-cli.safetensors"
        r = invoke("merge", "--base", tmp / "base", f"{tmp / 'ft1'}:1", f"{tmp / 'ft2'}:3",
                   *flags, "--out", cli, "-q")
        assert r.exit_code == 0, r.stderr
        want = load_file(cli)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
    r = invoke("merge", "--config", _config(tmp, "tok", head + "merge_method: ties\n" + models
                                            + "tokenizer_source: union\n"),
               "--out", tmp / "t.safetensors")
    assert r.exit_code == 1 and "tokenizer_source" in r.stderr and "--allow-resize" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
