"""LoRA adapters as factored task vectors: PEFT adapters (random non-zero B) on a tiny Llama and
a tiny CLIP; merging at weight 1 equals PEFT's merge_and_unload(); consumers expand factors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)


def _lora(model, **kw):
    config = peft.LoraConfig(init_lora_weights=False, **kw)  # random A and B: not a no-op
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base dir, adapter dir, merged state dict, merged dir) for a tiny Llama."""
    root = tmp_path_factory.mktemp("lora-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(root / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    pm = _lora(
        model, r=4, lora_alpha=8, use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 16},
        modules_to_save=["lm_head"],
    )
    with torch.no_grad():  # the saved module changes too
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.01)
    pm.save_pretrained(root / "adapter")
    pm.save_pretrained(root / "adapter-bin", safe_serialization=False)  # adapter_model.bin
    merged = pm.merge_and_unload()
    merged.save_pretrained(root / "merged")
    return root / "base", root / "adapter", merged.state_dict(), root / "merged"


def _merge(invoke, base: Path, out: Path, *terms: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    r = invoke("merge", "--base", base, "--out", out, *terms, "-q")
    assert r.exit_code == 0, r.stderr
    return load_file(out)


def test_llama_adapter_is_stored_factored_and_merges_like_peft(llama, invoke, tmp_path):
    from tvtool.store.store import Store

    base, adapter, merged, _ = llama
    r = invoke("extract", base, "--lora", adapter, "--name", "lora", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    factors = doc["params"]["factored"]["tensors"]
    assert set(factors) == {
        f"model.layers.{i}.{m}.weight"
        for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    } | {"model.embed_tokens.weight"}
    assert factors["model.layers.0.mlp.down_proj.weight"]["rank"] == 2
    assert factors["model.layers.0.mlp.down_proj.weight"]["scale"] == pytest.approx(16 / 2**0.5)
    assert factors["model.embed_tokens.weight"]["transpose"] is True
    stored = {t["name"] for t in doc["tensors"]}
    assert "model.layers.0.self_attn.q_proj.weight::lora_A" in stored
    assert "lm_head.weight" in stored  # modules_to_save: dense
    assert not any(n.startswith("model.layers.0.self_attn.q_proj.weight") and "::" not in n
                   for n in stored)
    dense_numel = doc["params"]["dense_numel"]
    assert doc["numel"] < dense_numel
    out = _merge(invoke, base / "model.safetensors", tmp_path / "m.safetensors", "lora:1")
    assert set(out) == set(merged)
    for k, v in merged.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=1e-6, msg=k)
    assert invoke("store", "verify").exit_code == 0
    # the l2 recorded from the factors is the dense vector's
    tau_sq = sum(float((merged[k].double() - v.double()).square().sum())
                 for k, v in _base_state(base).items())
    assert doc["params"]["l2"] == pytest.approx(tau_sq**0.5, rel=1e-5)
    assert Store().manifest(doc["digest"]).params["lora"]["use_rslora"] is True
    # the same adapter saved as adapter_model.bin stores the same bytes (one object)
    assert (adapter.parent / "adapter-bin" / "adapter_model.bin").is_file()
    b = invoke("extract", base, "--lora", adapter.parent / "adapter-bin", "-q")
    assert b.exit_code == 0, b.stderr
    assert b.stdout.strip() == doc["digest"]


def _base_state(base: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(base / "model.safetensors")


def test_factored_and_dense_vectors_mix_in_every_method(llama, invoke, tmp_path):
    base, adapter, _, merged_dir = llama
    assert invoke("extract", base, "--lora", adapter, "--name", "f", "-q").exit_code == 0
    adapted = r"(q_proj|v_proj|down_proj|embed_tokens|lm_head)\.weight$"  # the same tensors
    assert invoke("extract", base, merged_dir, "--name", "d", "--include", adapted,
                  "-q").exit_code == 0
    bfile = base / "model.safetensors"
    for method in (["--method", "ties", "--density", "0.3"],
                   ["--method", "magnitude", "--density", "0.5", "--ties-scope", "tensor"]):
        f = _merge(invoke, bfile, tmp_path / "f.safetensors", "f", *method, "--force")
        d = _merge(invoke, bfile, tmp_path / "d.safetensors", "d", *method, "--force")
        for k in d:
            torch.testing.assert_close(f[k], d[k], rtol=0, atol=1e-5, msg=(method, k))
    # DARE draws its mask per (vector digest, tensor): the paper's rule on the expanded tensor
    from tvtool.store.store import Store
    from tvtool.vectors.methods.ops import dare_seed
    from tvtool.vectors.stored import load_tensor_object

    f = _merge(invoke, bfile, tmp_path / "f.safetensors", "f", "--method", "dare", "--drop",
               "0.5", "--seed", "3", "--force")
    digest = Store().resolve("f")
    _, dense = load_tensor_object(Store(), "d", "vector")
    b = _base_state(base)
    for k, tau in dense.items():
        g = torch.Generator().manual_seed(dare_seed(3, digest, k))
        keep = (torch.rand(tau.numel(), generator=g) >= 0.5).view(tau.shape)
        torch.testing.assert_close(f[k], b[k] + tau * keep / 0.5, rtol=0, atol=1e-5, msg=k)
    half = _merge(invoke, bfile, tmp_path / "h.safetensors", "f:0.5", "d:0.5")
    one = _merge(invoke, bfile, tmp_path / "o.safetensors", "d:1")
    for k in half:
        torch.testing.assert_close(half[k], one[k], rtol=0, atol=1e-5)
    i = invoke("inspect", "f", "d", "--json")
    assert i.exit_code == 0, i.stderr
    rep = json.loads(i.stdout)
    vf, vd = rep["vectors"]
    assert vf["numel"] == vd["numel"] and vf["l2"] == pytest.approx(vd["l2"], rel=1e-5)
    assert rep["cosine"]["matrix"][0][1] == pytest.approx(1.0, abs=1e-5)


def test_clip_adapter_merges_like_peft_and_composes(tmp_path, invoke):
    from safetensors.torch import load_file
    from test_hf_clip import clip_config

    from tvtool.models.bank import load_stacks, plan_bank
    from tvtool.models.build import load_clip
    from tvtool.models.functional import visual_params
    from tvtool.models.weights import apply_delta, vectors_delta
    from tvtool.store.store import Store

    torch.manual_seed(0)
    transformers.CLIPModel(clip_config()).save_pretrained(tmp_path / "base")
    model = transformers.CLIPModel.from_pretrained(tmp_path / "base")
    pm = _lora(model, r=2, lora_alpha=4, target_modules=r".*vision_model.*\.(q_proj|v_proj|fc1)")
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload().state_dict()
    r = invoke("extract", tmp_path / "base", "--lora", tmp_path / "adapter", "--name", "cl", "-q")
    assert r.exit_code == 0, r.stderr
    out = _merge(invoke, tmp_path / "base" / "model.safetensors", tmp_path / "m.safetensors",
                 "cl:1")
    base = load_file(tmp_path / "base" / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], out[k])}
    assert changed and all(k.startswith("vision_model.") for k in changed)
    for k in base:
        torch.testing.assert_close(out[k], merged[k], rtol=0, atol=1e-6, msg=k)
    # compose/eval: one coefficient per LoRA-adapted tensor; expanded on the fly
    clip = load_clip(base=tmp_path / "base")
    store = Store()
    plan = plan_bank(store, ["cl"], visual_params(clip), set(clip.model.state_dict()),
                     clip.base_fingerprint)
    assert {k.key for k in plan.keys} == changed
    stacks = load_stacks(store, plan, torch.device("cpu"), torch.float32)
    assert all(s.factors is not None and s.tensor.numel() == 0 for s in stacks)  # factors only
    assert sum(s.nbytes for s in stacks) < sum(4 * base[k].numel() for k in changed)
    ones = torch.ones(1, len(plan.keys))
    from compose_assets import load_bank

    from tvtool.compose.coefs import compose_params

    _, layout, stacks = load_bank(clip, store, ["cl"])
    composed = compose_params(ones[:, : layout.n_groups], stacks, layout, visual_params(clip))
    for k, v in composed.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
    # random coefficients, partitions and gradients: the same as the dense vector of the merge
    pm_dir = tmp_path / "merged"
    transformers.CLIPModel.from_pretrained(tmp_path / "base").save_pretrained(pm_dir)
    from safetensors.torch import save_file

    save_file({k: merged[k].contiguous() for k in base}, str(pm_dir / "model.safetensors"))
    adapted = "|".join(k.replace(".", r"\.") for k in sorted(changed))
    r = invoke("extract", tmp_path / "base", pm_dir, "--include", f"^({adapted})$",
               "--name", "cd", "-q")
    assert r.exit_code == 0, r.stderr
    torch.manual_seed(3)
    for partitions in (1, 2):
        _, lf, sf = load_bank(clip, store, ["cl"], partitions=partitions)
        _, ld, sd = load_bank(clip, store, ["cd"], partitions=partitions)
        assert lf.model_dump(exclude={"vectors"}) == ld.model_dump(exclude={"vectors"})
        lam = torch.randn(1, lf.n_groups, dtype=torch.float64).float().requires_grad_(True)
        target = {k: torch.randn_like(v) for k, v in base.items() if k in changed}
        grads = []
        for st, lay in ((sf, lf), (sd, ld)):
            out = compose_params(lam, st, lay, visual_params(clip))
            loss = sum((out[k] * t).sum() for k, t in target.items())
            grads.append(torch.autograd.grad(loss, lam)[0])
            if st is sf:
                first = {k: v.detach() for k, v in out.items()}
        for k, v in first.items():
            torch.testing.assert_close(v, out[k].detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    applied = apply_delta(clip, vectors_delta(clip, store, [("cl", 1.0)]))
    for k, v in applied.items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)


def test_adapter_errors_are_clear(llama, invoke, tmp_path):
    base, adapter, _, merged_dir = llama
    cases = [
        (["extract", base, "--lora", tmp_path], "no adapter_config.json"),
        (["extract", base, merged_dir, "--lora", adapter], "exactly one"),
        (["extract", base], "exactly one"),
    ]
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    cases.append((["extract", base, "--lora", dora], "DoRA"))
    other = tmp_path / "other"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**LLAMA, "num_hidden_layers": 1})
    ).save_pretrained(other)
    cases.append((["extract", other, "--lora", adapter], "match no base tensor"))
    for args, message in cases:
        r = invoke(*args)
        assert r.exit_code == 1, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_inspect_computes_factored_norms_and_cosines_from_the_factors(
        llama, invoke, tmp_path, monkeypatch):
    """Two factored adapters and a dense vector: every statistic equals the dense computation
    (PEFT's merge_and_unload minus the base); with only factored vectors nothing is expanded."""
    import torch.nn.functional as F

    from tvtool.vectors import stored

    base, adapter, merged1, merged_dir = llama
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(5)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        init_lora_weights=False, r=3, lora_alpha=6,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    pm.save_pretrained(tmp_path / "adapter2")
    merged2 = pm.merge_and_unload().state_dict()
    for name, src in (("f1", adapter), ("f2", tmp_path / "adapter2")):
        assert invoke("extract", base, "--lora", src, "--name", name, "-q").exit_code == 0
    assert invoke("extract", base, merged_dir, "--name", "d", "--include",
                  r"(q_proj|embed_tokens)\.weight$", "-q").exit_code == 0
    b = _base_state(base)
    dense = {  # the reference: dense task vectors from PEFT's merges, float64
        "f1": {k: merged1[k].double() - b[k].double() for k in b
               if not torch.equal(merged1[k], b[k])},
        "f2": {k: merged2[k].double() - b[k].double() for k in b
               if not torch.equal(merged2[k], b[k])},
    }
    dense["d"] = {k: v for k, v in dense["f1"].items() if k.endswith(
        ("q_proj.weight", "embed_tokens.weight"))}

    def check(names: list[str], doc: dict) -> None:
        keys = sorted({k for n in names for k in dense[n]})
        flat = {n: torch.cat([dense[n].get(k, torch.zeros_like(b[k], dtype=torch.float64))
                              .reshape(-1) for k in keys]) for n in names}
        for n, v in zip(names, doc["vectors"], strict=True):
            assert v["l2"] == pytest.approx(float(flat[n].norm()), rel=1e-5), n
            assert v["max_abs"] == pytest.approx(float(flat[n].abs().max()), rel=1e-5), n
            for blk in v["blocks"]:
                t = dense[n][blk["name"]]
                assert blk["l2"] == pytest.approx(float(t.norm()), rel=1e-5)
                assert blk["max_abs"] == pytest.approx(float(t.abs().max()), rel=1e-5)
                assert blk["frac_zero"] == pytest.approx(float((t == 0).double().mean()))
            assert [blk["name"] for blk in v["blocks"]] == sorted(dense[n])
        for i, p in enumerate(names):
            for j, q in enumerate(names):
                want = float(F.cosine_similarity(flat[p], flat[q], dim=0))
                assert doc["cosine"]["matrix"][i][j] == pytest.approx(want, abs=1e-5)
                both = (flat[p] != 0) & (flat[q] != 0)
                same = float((flat[p][both].sign() == flat[q][both].sign()).double().mean())
                assert doc["sign_agreement"]["matrix"][i][j] == pytest.approx(same, abs=1e-3)
        pairs = doc["per_block_cosine"]["pairs"]
        for blk in doc["per_block_cosine"]["blocks"]:
            for (p, q), c in zip(pairs, blk["cosine"], strict=True):
                x, y = dense[p].get(blk["name"]), dense[q].get(blk["name"])
                if x is None or y is None:
                    assert c is None
                else:
                    want = float(F.cosine_similarity(x.reshape(-1), y.reshape(-1), dim=0))
                    assert c == pytest.approx(want, abs=1e-5)

    r = invoke("inspect", "f1", "f2", "d", "--json", "--per-block")  # mixed: d's keys expanded
    assert r.exit_code == 0, r.stderr
    check(["f1", "f2", "d"], json.loads(r.stdout))

    def no_expansion(*args):
        raise AssertionError("a factored tensor was expanded whole")

    monkeypatch.setattr(stored, "expand", no_expansion)
    r = invoke("inspect", "f1", "f2", "--json", "--per-block")  # factored only: tiles, no dense
    assert r.exit_code == 0, r.stderr
    check(["f1", "f2"], json.loads(r.stdout))
    from tvtool.vectors.factored_stats import factored_gram

    a, bb = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    a2, b2 = torch.randn(2, 7, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    g = factored_gram([(a, bb, 0.5, False), (a2, b2, -2.0, False)])
    x, y = 0.5 * bb @ a, -2.0 * b2 @ a2
    want = torch.tensor([[(x * x).sum(), (x * y).sum()], [(x * y).sum(), (y * y).sum()]])
    torch.testing.assert_close(g, want.double())
