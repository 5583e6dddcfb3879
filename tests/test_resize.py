"""Vocabulary resizes: `extract --allow-resize` then `merge` onto the base (tiny random Llamas
from a LlamaConfig whose fine-tunes called `resize_token_embeddings`); the merged folder loads
with AutoModelForCausalLM and gives the logits of a reference built in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
           tie_word_embeddings=False)
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _finetune(base: LlamaForCausalLM, seed: int, out: Path, grow: int = 0) -> dict:
    ft = LlamaForCausalLM(LlamaConfig(**CFG))
    g = torch.Generator().manual_seed(seed)
    ft.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g)
                        for k, v in base.state_dict().items()})
    if grow:
        ft.resize_token_embeddings(CFG["vocab_size"] + grow)
        with torch.no_grad():  # the new rows are trained too
            for w in (ft.model.embed_tokens.weight, ft.lm_head.weight):
                w[CFG["vocab_size"]:] = torch.randn(max(grow, 0), w.shape[1], generator=g)
    ft.save_pretrained(out)
    return {k: v.detach().clone() for k, v in ft.state_dict().items()}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """base/, grow3a/ and grow3b/ (3 added tokens each), grow5/ (5), plain/ (no resize),
    shrink/ (4 tokens fewer)."""
    tmp = tmp_path_factory.mktemp("resize")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**CFG))
    base.save_pretrained(tmp / "base")
    (tmp / "base" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    sds = {"base": {k: v.detach().clone() for k, v in base.state_dict().items()}}
    for name, seed, grow in (("grow3a", 1, 3), ("grow3b", 2, 3), ("grow5", 3, 5), ("plain", 4, 0),
                             ("shrink", 5, -4)):
        sds[name] = _finetune(base, seed, tmp / name, grow)
    return tmp, sds


def _extract(invoke, tmp: Path, name: str, *extra: str) -> None:
    r = invoke("extract", tmp / "base", tmp / name, "--allow-resize", "--name", name, "-q",
               *extra)
    assert r.exit_code == 0, r.stderr


def _reference(sds: dict, terms: dict[str, float], added: list[str], rows: int) -> dict:
    """base + sum_t w_t (ft_t - base) on the shared rows; added rows: mean of the adders'."""
    b, n = sds["base"], CFG["vocab_size"]
    out = {}
    for k, v in b.items():
        x = v.clone()
        for name, w in terms.items():
            x += w * (sds[name][k][: v.shape[0]] - v)
        if k in (EMB, HEAD):
            extra = torch.stack([sds[a][k][n:rows] for a in added]).mean(0)
            x = torch.cat([x, extra])
        out[k] = x
    return out


def test_grown_vocabulary_merges_into_a_folder_that_loads(invoke, llamas, tmp_path):
    tmp, sds = llamas
    _extract(invoke, tmp, "grow3a")
    _extract(invoke, tmp, "plain")
    out = tmp_path / "merged"
    r = invoke("merge", "--base", tmp / "base", "grow3a:0.5", "plain:0.5", "--out", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert "64 to 67 rows" in r.stderr and "tokenizer" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((tmp / "base" / "config.json").read_text())
    assert cfg == {**base_cfg, "vocab_size": 67}
    assert (out / "tokenizer_config.json").read_bytes() == (
        tmp / "base" / "tokenizer_config.json").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = LlamaForCausalLM(LlamaConfig(**{**CFG, "vocab_size": 67})).eval()
    ref.load_state_dict(_reference(sds, {"grow3a": 0.5, "plain": 0.5}, ["grow3a"], 67))
    ids = torch.tensor([[1, 65, 3, 66, 64, 7]])  # added tokens included
    with torch.no_grad():
        got, want = merged(ids).logits, ref(ids).logits
    assert got.shape[-1] == 67
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the added rows are the fine-tune's, whatever the weight
    emb = merged.model.embed_tokens.weight.detach()
    torch.testing.assert_close(emb[64:], sds["grow3a"][EMB][64:], rtol=0, atol=0)


def test_two_vectors_adding_rows_give_their_mean_and_every_method_runs(invoke, llamas, tmp_path):
    tmp, sds = llamas
    _extract(invoke, tmp, "grow3a")
    _extract(invoke, tmp, "grow3b")
    out = tmp_path / "m.safetensors"
    r = invoke("merge", "--base", tmp / "base", "grow3a:0.3", "grow3b:0.7", "--out", out,
               "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resized"] == {EMB: [64, 67], HEAD: [64, 67]}
    got = load_file(out)
    want = _reference(sds, {"grow3a": 0.3, "grow3b": 0.7}, ["grow3a", "grow3b"], 67)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    for method in ("ties", "dare", "slerp"):
        r = invoke("merge", "--base", tmp / "base", "grow3a", "grow3b", "--method", method,
                   "--out", tmp_path / f"{method}.safetensors", "-q")
        assert r.exit_code == 0, (method, r.stderr)
        m = load_file(tmp_path / f"{method}.safetensors")
        assert m[EMB].shape == (67, 16)
        torch.testing.assert_close(m[HEAD][64:], want[HEAD][64:], rtol=0, atol=1e-6)


def test_resize_refusals_are_one_line(invoke, llamas, tmp_path):
    tmp, _ = llamas
    for name in ("grow3a", "grow5", "shrink"):
        _extract(invoke, tmp, name)
    base = ("merge", "--base", tmp / "base", "--out", tmp_path / "x.safetensors")
    cases = [
        (("grow3a", "grow5"), "different sizes"),
        (("-grow3a:0.5",), "negated"),
        (("shrink",), "shrank the vocabulary"),
    ]
    for terms, needle in cases:
        r = invoke(*base, *terms)
        assert r.exit_code == 1 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = invoke(*base, tmp / "grow3a")  # a resized fine-tune as a TERM: extract it first
    assert r.exit_code == 1 and "--allow-resize" in r.stderr, r.stderr
    # an embedding grown without its untied head: the folder would not load
    _extract(invoke, tmp, "grow3a", "--include", "embed_tokens", "--name", "emb-only", "--force")
    r = invoke("merge", "--base", tmp / "base", "emb-only", "--out", tmp_path / "dir")
    assert r.exit_code == 1 and "lm_head.weight keeps 64 rows" in r.stderr, r.stderr
    # compose, select and eval keep the base's shapes: refused by the bank plan
    from tvtool.errors import TvtoolError
    from tvtool.models.bank import plan_bank
    from tvtool.store.store import Store

    params = {EMB: torch.zeros(64, 16)}
    with pytest.raises(TvtoolError, match="adds vocabulary rows .*64 -> 67.*tvtool merge"):
        plan_bank(Store(), ["grow3a"], params, set(params))
    r = invoke("select", "grow3a", "--score", "norm", "--top", "1")  # data-free: no model
    assert r.exit_code == 1 and "adds vocabulary rows" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
