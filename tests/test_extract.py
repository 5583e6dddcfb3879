"""`tvtool extract`: round trips against plain torch, dedup, filters, dtypes and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reader_helpers import content_fingerprint

from tvtool.store.store import Store
from tvtool.vectors.stored import load_tensor_object

ROOT = Path(__file__).resolve().parents[1]


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=g),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(6, 2, generator=g),
        "visual.transformer.resblocks.0.attn.out_proj.weight": torch.randn(2, 2, generator=g),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(8, 2, generator=g),
        "visual.ln_post.bias": torch.randn(2, generator=g),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(6, 2, generator=g),
        "token_embedding.weight": torch.randn(5, 2, generator=g).half(),
        "text.position_ids": torch.arange(5),
    }
    return sd


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    base, ft = model(0), model(0)
    g = torch.Generator().manual_seed(7)
    for k, v in ft.items():
        if v.is_floating_point():
            ft[k] = (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
    bp, fp = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    safetensors.torch.save_file(base, bp)
    safetensors.torch.save_file(ft, fp)
    expected = {k: ft[k].float() - base[k].float() for k in base if base[k].is_floating_point()}
    return bp, fp, expected


def stored(name: str) -> tuple[object, dict[str, torch.Tensor]]:
    return load_tensor_object(Store(), name, "vector")


def test_round_trip_matches_plain_torch(invoke, pair) -> None:
    bp, fp, expected = pair
    r = invoke("extract", bp, fp, "--name", "tiny/a")
    assert r.exit_code == 0, r.stderr
    digest = r.stdout.strip()
    assert len(digest) == 64 and r.stdout == digest + "\n"
    assert "stored" in r.stderr and "non-float" in r.stderr and "text.position_ids" in r.stderr
    manifest, tensors = stored("tiny/a")
    assert manifest.digest == digest and manifest.kind == "vector"
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        assert tensors[k].dtype == torch.float32
        torch.testing.assert_close(tensors[k], v, rtol=0, atol=0)
    p = manifest.params
    assert p["base"]["fingerprint"] == content_fingerprint(safetensors.torch.load_file(bp))
    assert p["finetuned"]["fingerprint"] == content_fingerprint(safetensors.torch.load_file(fp))
    assert p["base_fingerprint"] == p["base"]["fingerprint"]
    assert p["sources"] == [{"base": str(bp.resolve()), "base_format": "safetensors",
                             "finetuned": str(fp.resolve()), "finetuned_format": "safetensors",
                             "finetuned_fingerprint": p["finetuned"]["fingerprint"]}]
    assert p["base"]["path"] == str(bp.resolve())
    assert p["skipped_non_float"] == ["text.position_ids"]
    assert p["storage_dtype"] == "fp32" and p["max_rounding_error"] == 0.0
    assert manifest.numel == sum(v.numel() for v in expected.values())
    flat = torch.cat([v.reshape(-1) for v in expected.values()])
    assert p["l2"] == pytest.approx(float(torch.linalg.norm(flat.double())), rel=1e-6)
    assert [t.name for t in manifest.tensors] == sorted(expected)


def test_quiet_json_and_dedup(invoke, pair) -> None:
    bp, fp, _ = pair
    q = invoke("extract", bp, fp, "-q")
    assert q.exit_code == 0 and q.stderr == ""
    digest = q.stdout.strip()
    j = invoke("extract", bp, fp, "--json")
    doc = json.loads(j.stdout)
    assert doc["digest"] == digest and doc["deduplicated"] is True
    assert doc["kind"] == "vector" and doc["params"]["skipped_non_float"] == ["text.position_ids"]
    assert len(list(Store().iter_digests())) == 1


def test_formats_give_the_same_vector(invoke, pair, tmp_path: Path) -> None:
    """A .pt state dict with a DDP prefix and a safetensors file hold the same weights."""
    bp, fp, _ = pair
    d1 = invoke("extract", bp, fp, "-q").stdout.strip()
    ft = safetensors.torch.load_file(fp)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ft.items()}}, tmp_path / "ft.pt")
    d2 = invoke("extract", bp, tmp_path / "ft.pt", "-q").stdout.strip()
    assert d1 == d2


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_storage_dtype_and_rounding_error(invoke, pair, dtype: str) -> None:
    bp, fp, expected = pair
    r = invoke("extract", bp, fp, "--dtype", dtype, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    worst = max(float((v.to(torch_dtype).float() - v).abs().max()) for v in expected.values())
    assert doc["params"]["max_rounding_error"] == pytest.approx(worst, rel=1e-6)
    assert worst > 0
    assert doc["dtype"] == {"fp16": "F16", "bf16": "BF16"}[dtype]
    _, tensors = stored(doc["digest"])
    for k, v in expected.items():
        assert torch.equal(tensors[k], v.to(torch_dtype)), k


def test_fp16_overflow_refused(invoke, tmp_path: Path) -> None:
    safetensors.torch.save_file({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    safetensors.torch.save_file({"w": torch.tensor([1.0, 1e6, 2.0])}, tmp_path / "f.safetensors")
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors", "--dtype", "fp16")
    assert r.exit_code == 1 and "does not fit in fp16" in r.stderr


@pytest.mark.parametrize(
    ("args", "kept"),
    [
        (
            ["--preset", "attn"],
            {
                "visual.transformer.resblocks.0.attn.in_proj_weight",
                "visual.transformer.resblocks.0.attn.out_proj.weight",
                "transformer.resblocks.0.attn.in_proj_weight",
            },
        ),
        (
            ["--preset", "visual", "--preset", "attn"],
            {
                "visual.transformer.resblocks.0.attn.in_proj_weight",
                "visual.transformer.resblocks.0.attn.out_proj.weight",
            },
        ),
        (
            ["--include", "^visual", "--exclude", "attn", "--exclude", "conv"],
            {"visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.ln_post.bias"},
        ),
    ],
)
def test_filters(invoke, pair, args: list[str], kept: set[str]) -> None:
    bp, fp, _ = pair
    r = invoke("extract", bp, fp, *args, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {t["name"] for t in doc["tensors"]} == kept
    assert doc["params"]["filters"]["presets"] == [
        a for i, a in enumerate(args) if i % 2 and args[i - 1] == "--preset"
    ]


def test_nothing_selected(invoke, pair) -> None:
    bp, fp, _ = pair
    r = invoke("extract", bp, fp, "--include", "^nomatch")
    assert r.exit_code == 1 and "no tensors selected" in r.stderr


def test_bad_options(invoke, pair) -> None:
    bp, fp, _ = pair
    assert "unknown preset" in invoke("extract", bp, fp, "--preset", "vision").stderr
    assert "unknown dtype" in invoke("extract", bp, fp, "--dtype", "fp64").stderr
    assert "invalid --include regex" in invoke("extract", bp, fp, "--include", "(").stderr
    assert "invalid ref name" in invoke("extract", bp, fp, "--name", "../x").stderr


def test_name_not_moved_without_force(invoke, pair, tmp_path: Path) -> None:
    bp, fp, _ = pair
    first = invoke("extract", bp, fp, "-q", "--name", "v").stdout.strip()
    r = invoke("extract", fp, bp, "-q", "--name", "v")  # the negated vector
    assert r.exit_code == 1 and "--force" in r.stderr
    assert Store().get_ref("v") == first
    r = invoke("extract", fp, bp, "-q", "--name", "v", "--force")
    assert r.exit_code == 0 and Store().get_ref("v") == r.stdout.strip() != first


def _no_objects() -> bool:
    s = Store()
    leftovers = list(s.tmp_dir.iterdir()) if s.tmp_dir.exists() else []
    return not list(s.iter_digests()) and not leftovers


def test_key_mismatch_names_keys_and_counts(invoke, tmp_path: Path) -> None:
    base = {f"layer{i}.w": torch.zeros(2) for i in range(10)}
    ft = {f"layer{i}.w": torch.zeros(2) for i in range(3)} | {"extra.w": torch.zeros(2)}
    ft["layer0.w"] = torch.zeros(3)
    safetensors.torch.save_file(base, tmp_path / "b.safetensors")
    safetensors.torch.save_file(ft, tmp_path / "f.safetensors")
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors")
    assert r.exit_code == 1
    msg = r.stderr
    assert "7 key(s) only in the base" in msg and "and 2 more" in msg
    assert "1 key(s) only in the fine-tuned model: extra.w" in msg
    assert "shape mismatch" in msg and "layer0.w ([2] vs [3])" in msg
    assert "Traceback" not in msg
    assert _no_objects()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_refused_unless_allowed(invoke, tmp_path: Path, bad: float) -> None:
    safetensors.torch.save_file(
        {"a": torch.zeros(4), "z": torch.zeros(2)}, tmp_path / "b.safetensors"
    )
    safetensors.torch.save_file(
        {"a": torch.ones(4), "z": torch.tensor([bad, 1.0])}, tmp_path / "f.safetensors"
    )
    args = ("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors")
    r = invoke(*args)
    assert r.exit_code == 1 and "NaN/Inf" in r.stderr and "'z'" in r.stderr
    assert "nothing was stored" in r.stderr
    assert _no_objects()
    r = invoke(*args, "--allow-nonfinite", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["params"]["nonfinite"] == 1
    assert doc["params"]["l2"] == pytest.approx(5**0.5)  # finite entries only


def test_missing_and_truncated_inputs(invoke, pair, tmp_path: Path) -> None:
    bp, fp, _ = pair
    r = invoke("extract", bp, tmp_path / "nope.safetensors")
    assert r.exit_code == 1 and "not found" in r.stderr
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(fp.read_bytes()[:-7])
    r = invoke("extract", bp, bad)
    assert r.exit_code == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_pickled_module_checkpoints(invoke, tmp_path: Path) -> None:
    """Two whole pickled modules (keys under `model.`) give the vector of their state dicts."""
    from pickled_modules import ImageEncoder, save_under_fake_module

    torch.manual_seed(0)
    base = ImageEncoder()
    ft = ImageEncoder()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.5)
    save_under_fake_module(base, tmp_path / "zeroshot.pt")
    save_under_fake_module(ft, tmp_path / "finetuned.pt")
    r = invoke("extract", tmp_path / "zeroshot.pt", tmp_path / "finetuned.pt", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["params"]["base"]["format"] == "torch-module"
    assert doc["params"]["skipped_non_float"] == ["position_ids"]
    _, tensors = stored(doc["digest"])
    for k, v in base.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(tensors[k.removeprefix("model.")], torch.full_like(v, 0.5))


@pytest.mark.slow
def test_subprocess_quiet_composes(pair, tmp_path: Path, run_tvtool) -> None:
    bp, fp, _ = pair
    out = run_tvtool("extract", bp, fp, "-q", "--name", "sub/v", TVTOOL_HOME=str(tmp_path / "home"))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    digest = out.stdout.strip()
    assert len(digest) == 64
    assert Store(tmp_path / "home").get_ref("sub/v") == digest


def test_same_weights_as_pt_and_safetensors_give_one_vector_with_both_sources(
    invoke, pair, tmp_path: Path
) -> None:
    bp, fp, _ = pair
    bpt = tmp_path / "base.pt"
    torch.save({"state_dict": safetensors.torch.load_file(bp)}, bpt)
    first = invoke("extract", bp, fp, "--name", "v1")
    second = invoke("extract", bpt, fp, "--name", "v2")
    assert first.exit_code == 0 and second.exit_code == 0, second.stderr
    assert first.stdout == second.stdout  # one object
    manifest, _ = stored("v2")
    p = manifest.params
    assert p["base_fingerprint"] == content_fingerprint(safetensors.torch.load_file(bp))
    assert [(s["base"], s["base_format"]) for s in p["sources"]] == [
        (str(bp.resolve()), "safetensors"), (str(bpt.resolve()), "torch")]
    third = invoke("extract", bpt, fp)  # the same pair again adds nothing
    assert third.exit_code == 0
    assert len(stored("v1")[0].params["sources"]) == 2
    assert invoke("store", "verify").exit_code == 0


def test_norm_overflow_is_not_mistaken_for_nonfinite(invoke, tmp_path: Path) -> None:
    base = {"w": torch.zeros(4)}
    ft = {"w": torch.tensor([3e19, -3e19, 1.0, 0.0])}  # squares overflow fp32, values do not
    safetensors.torch.save_file(base, tmp_path / "b.safetensors")
    safetensors.torch.save_file(ft, tmp_path / "f.safetensors")
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors", "--name", "big")
    assert r.exit_code == 0, r.stderr
    manifest, tensors = stored("big")
    assert torch.equal(tensors["w"], ft["w"])
    want = float(torch.linalg.vector_norm(ft["w"].double()))
    assert manifest.params["l2"] == pytest.approx(want, rel=1e-6)
    assert manifest.params["nonfinite"] == 0


# -- HF folders (issue 10): torch shards, several checkpoints, renames, tied embeddings --------


def _llama_like(seed: int, head: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
    }
    if head:
        sd["lm_head.weight"] = torch.randn(10, 4, generator=g)
    return sd


def _save_torch_shards(sd: dict[str, torch.Tensor], d: Path) -> None:
    d.mkdir(parents=True)
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:2],
             "pytorch_model-00002-of-00002.bin": keys[2:]}
    weight_map = {}
    for fname, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, d / fname)
        weight_map.update(dict.fromkeys(ks, fname))
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_torch_bins_with_index(invoke, tmp_path: Path) -> None:
    base, ft = _llama_like(0), _llama_like(1)
    _save_torch_shards(base, tmp_path / "base")
    _save_torch_shards(ft, tmp_path / "ft")
    r = invoke("extract", tmp_path / "base", tmp_path / "ft", "--name", "llm/bins")
    assert r.exit_code == 0, r.stderr
    manifest, tensors = stored("llm/bins")
    want = {k: ft[k] - base[k] for k in base}
    assert set(tensors) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(tensors[k], v, rtol=0, atol=0)
    assert manifest.params["base_fingerprint"] == content_fingerprint(base)


def test_directory_with_unrelated_checkpoints_names_them(invoke, tmp_path: Path) -> None:
    d = tmp_path / "several"
    d.mkdir()
    safetensors.torch.save_file(_llama_like(0), d / "a.safetensors")
    safetensors.torch.save_file(_llama_like(1), d / "b.safetensors")
    safetensors.torch.save_file(_llama_like(2), tmp_path / "ft.safetensors")
    r = invoke("extract", d, tmp_path / "ft.safetensors")
    assert r.exit_code == 1
    assert "holds 2 checkpoints (a.safetensors, b.safetensors)" in r.stderr
    assert "appears in two shards" not in r.stderr
    d2 = tmp_path / "bins"
    d2.mkdir()
    torch.save(_llama_like(0), d2 / "epoch1.pt")
    torch.save(_llama_like(1), d2 / "epoch2.pt")
    r = invoke("extract", d2, tmp_path / "ft.safetensors")
    assert r.exit_code == 1 and "epoch1.pt, epoch2.pt" in r.stderr


def test_rename_lines_up_keys(invoke, tmp_path: Path) -> None:
    base, ft = _llama_like(0), _llama_like(1)
    renamed = {k.replace("layers.", "blocks."): v for k, v in ft.items()}
    safetensors.torch.save_file(base, tmp_path / "b.safetensors")
    safetensors.torch.save_file(renamed, tmp_path / "f.safetensors")
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors")
    assert r.exit_code == 1 and "--rename" in r.stderr
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors",
               "--rename", r"blocks\.(\d+)=layers.\1", "--name", "ren")
    assert r.exit_code == 0, r.stderr
    _, tensors = stored("ren")
    for k in base:
        torch.testing.assert_close(tensors[k], ft[k] - base[k], rtol=0, atol=0)
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors",
               "--rename", r"^model\..*=x")  # maps two keys of a side to one name
    assert r.exit_code == 1 and "to one name" in r.stderr


def test_tied_embedding_base_against_untied_finetune(invoke, tmp_path: Path) -> None:
    base = _llama_like(0, head=False)  # every key starts with model.
    ft = _llama_like(1)
    (tmp_path / "base").mkdir()
    safetensors.torch.save_file(base, tmp_path / "base" / "model.safetensors")
    safetensors.torch.save_file(ft, tmp_path / "ft.safetensors")
    r = invoke("extract", tmp_path / "base", tmp_path / "ft.safetensors")
    assert r.exit_code == 1 and "tie_word_embeddings" in r.stderr  # no config.json: a hint
    (tmp_path / "base" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    r = invoke("extract", tmp_path / "base", tmp_path / "ft.safetensors", "--name", "tied")
    assert r.exit_code == 0, r.stderr
    assert "ties lm_head.weight" in r.stderr
    _, tensors = stored("tied")
    want = {k: ft[k] - base[k] for k in base}
    want["lm_head.weight"] = ft["lm_head.weight"] - base["model.embed_tokens.weight"]
    assert set(tensors) == set(want)  # the base's own names, model. prefix kept
    for k, v in want.items():
        torch.testing.assert_close(tensors[k], v, rtol=0, atol=0)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert invoke("extract", tmp_path / "base", tmp_path / "ft.safetensors").exit_code == 1


def test_non_float_tensor_on_one_side_only_is_skipped(invoke, tmp_path: Path) -> None:
    base, ft = _llama_like(0), _llama_like(1)
    ft["model.position_ids"] = torch.arange(10)
    safetensors.torch.save_file(base, tmp_path / "b.safetensors")
    safetensors.torch.save_file(ft, tmp_path / "f.safetensors")
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors", "--name", "p")
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 non-float" in r.stderr and "position_ids" in r.stderr
    manifest, tensors = stored("p")
    assert set(tensors) == set(base)
    assert manifest.params["skipped_non_float"] == ["model.position_ids"]


def test_fingerprint_cache_is_used_only_while_the_file_is_unchanged(invoke, pair) -> None:
    from tvtool.checkpoints.fingerprint import FingerprintCache
    from tvtool.checkpoints.readers import open_checkpoint

    bp, fp, _ = pair
    assert invoke("extract", bp, fp).exit_code == 0
    cache = FingerprintCache(Store().root / "cache" / "fingerprints")
    with open_checkpoint(bp) as r:
        assert cache.apply(r) and r.fingerprint() == content_fingerprint(
            safetensors.torch.load_file(bp))
    changed = safetensors.torch.load_file(bp)
    changed["visual.ln_post.bias"] += 1.0
    safetensors.torch.save_file(changed, bp)  # new content (and a new ctime)
    with open_checkpoint(bp) as r:
        assert not cache.apply(r)
    r = invoke("extract", bp, fp, "--name", "after")
    assert r.exit_code == 0, r.stderr
    assert stored("after")[0].params["base_fingerprint"] == content_fingerprint(changed)


def test_allow_resize_vocabulary(invoke, tmp_path: Path) -> None:
    base, ft = _llama_like(0), _llama_like(1)
    g = torch.Generator().manual_seed(3)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        ft[k] = torch.cat([ft[k], torch.randn(2, 4, generator=g)])  # 2 tokens added
    safetensors.torch.save_file(base, tmp_path / "b.safetensors")
    safetensors.torch.save_file(ft, tmp_path / "f.safetensors")
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors")
    assert r.exit_code == 1 and "shape mismatch" in r.stderr
    r = invoke("extract", tmp_path / "b.safetensors", tmp_path / "f.safetensors",
               "--allow-resize", "--name", "resized")
    assert r.exit_code == 0, r.stderr
    manifest, tensors = stored("resized")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(tensors[k], ft[k][:10] - base[k], rtol=0, atol=0)
        torch.testing.assert_close(tensors[k + ".added_rows"], ft[k][10:], rtol=0, atol=0)
        assert manifest.params["resized"][k] == {
            "base_rows": 10, "finetuned_rows": 12, "added_rows": k + ".added_rows"}
    torch.testing.assert_close(tensors["model.norm.weight"],
                               ft["model.norm.weight"] - base["model.norm.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_difference_matches_plain_torch_across_slices(monkeypatch, dtype) -> None:
    from tvtool.vectors import extract

    monkeypatch.setattr(extract, "FUSED", 100)  # 10 slices and a part
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(31, 33, generator=g), torch.randn(31, 33, generator=g).half()
    d = torch.empty(31, 33)
    o = None if dtype == torch.float32 else torch.empty(31, 33, dtype=dtype)
    sq, err = extract._fused_diff(a, b, d, o)
    want = a - b.float()
    assert torch.equal(d, want)
    stored = want if o is None else want.to(dtype).float()
    if o is not None:
        assert torch.equal(o, want.to(dtype))
    assert sq == pytest.approx(float(stored.double().pow(2).sum()), rel=1e-6)
    assert err == float((stored - want).abs().max())
    sq, _ = extract._fused_diff(a, None, d, o)  # rows only one side has: copied
    kept = a if o is None else a.to(dtype).float()
    assert torch.equal(d, a) and sq == pytest.approx(float(kept.double().pow(2).sum()), rel=1e-6)


def test_object_writer_hashes_behind_in_order(tmp_path: Path) -> None:
    """Small writes (hashed inline) and large ones (hashed on their own thread) interleaved,
    the caller refilling its two buffers in turn as the contract allows: the digest is the
    sha256 of the blob's bytes, and the blob holds exactly what was written."""
    import hashlib

    from tvtool.store import writer

    store = Store(tmp_path / "s")
    store.init()
    bufs = [bytearray(writer.HASH_BEHIND * 3 + 5) for _ in range(2)]
    expected = hashlib.sha256()
    with store.writer() as w:
        for i in range(9):
            if i % 3 == 0:
                piece: bytes | memoryview = f"header {i}".encode()
            else:
                buf = bufs[i % 2]
                buf[:] = bytes([i]) * len(buf)
                piece = memoryview(buf)
            expected.update(piece)
            w.write(piece)
        m = w.commit({"kind": "vector", "format": "safetensors"})
    assert m.digest == expected.hexdigest()
    assert hashlib.sha256(store.blob_path(m.digest).read_bytes()).hexdigest() == m.digest


def test_fingerprint_cache_skips_a_file_rewritten_while_it_was_read(pair, tmp_path) -> None:
    """The cache entry is keyed by the files as they were before they were read: a rewrite
    between the read and `put` leaves no entry (the hash may mix both contents)."""
    from tvtool.checkpoints.fingerprint import FingerprintCache
    from tvtool.checkpoints.readers import open_checkpoint

    bp, _, _ = pair
    cache = FingerprintCache(tmp_path / "fp")
    with open_checkpoint(bp) as r:
        assert not cache.apply(r)  # a miss, but the files' identity is noted
        r.fingerprint()
        changed = safetensors.torch.load_file(bp)
        changed["visual.ln_post.bias"] += 1.0
        safetensors.torch.save_file(changed, bp)
        cache.put(r)
    with open_checkpoint(bp) as r:
        assert cache.get(r) is None
        r.fingerprint()
        cache.put(r)  # unchanged since `get`: cached
    with open_checkpoint(bp) as r:
        assert cache.get(r) == content_fingerprint(changed)
