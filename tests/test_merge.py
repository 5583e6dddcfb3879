"""`merge` core against plain torch: every method on small random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tvtool.checkpoints.readers import open_checkpoint
from tvtool.checkpoints.writer import save_safetensors
from tvtool.errors import TvtoolError
from tvtool.store.store import Store
from tvtool.vectors.blocks import CoefsLayout, make_blocks, partition_ids
from tvtool.vectors.extract import extract_vector
from tvtool.vectors.merge import execute_merge, plan_merge
from tvtool.vectors.methods.ops import dare_seed
from tvtool.vectors.methods.topk import topk_count
from tvtool.vectors.recipe import MergeRequest, request_from_recipe
from tvtool.vectors.stored import save_tensor_object
from tvtool.vectors.terms import parse_terms

SHAPES = {
    "blocks.0.attn.weight": (12, 8),
    "blocks.0.attn.bias": (12,),
    "blocks.1.mlp.weight": (8, 16),
    "blocks.1.mlp.bias": (8,),
    "head.weight": (5, 8),
}


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def world(tmp_path: Path):
    """A base checkpoint (plus an int buffer), three stored task vectors named t0..t2."""
    base = {k: _rand(s, i) for i, (k, s) in enumerate(SHAPES.items())}
    base["position_ids"] = torch.arange(7)
    save_safetensors(tmp_path / "base.safetensors", base)
    store = Store()
    taus = []
    for t in range(3):
        tau = {k: _rand(s, 100 * (t + 1) + i) * 0.1 for i, (k, s) in enumerate(SHAPES.items())}
        digest = save_tensor_object(store, "vector", tau).digest
        store.set_ref(f"t{t}", digest)
        taus.append(tau)
    return tmp_path, store, base, taus


def run(store, tmp, terms, name="out.safetensors", **kw):
    req = MergeRequest(base=tmp / "base.safetensors", out=tmp / name,
                       terms=parse_terms(terms), **kw)
    plan = plan_merge(store, req)
    res = execute_merge(store, plan)
    with open_checkpoint(res.index or res.files[0]) as r:
        return {k: r.get(k) for k in r.keys()}, plan, res


def test_base_plus_extracted_vector_reproduces_finetuned_bit_for_bit(tmp_path):
    store = Store()
    base = {k: _rand(s, i) for i, (k, s) in enumerate(SHAPES.items())}
    base["position_ids"] = torch.arange(7)
    ft = {k: (v + _rand(v.shape, 50 + i) * 0.01 if v.is_floating_point() else v)
          for i, (k, v) in enumerate(base.items())}
    save_safetensors(tmp_path / "base.safetensors", base)
    save_safetensors(tmp_path / "ft.safetensors", ft)
    digest = extract_vector(store, tmp_path / "base.safetensors", tmp_path / "ft.safetensors")
    digest = digest.digest
    out, plan, _ = run(store, tmp_path, [f"{digest}:1.0"])
    assert plan.scale == 1.0 and len(plan.touched) == len(SHAPES)
    for k, v in ft.items():
        assert out[k].dtype == v.dtype
        assert torch.equal(out[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), k


def test_sum_weights_negation_and_default_scale(world):
    tmp, store, base, taus = world
    out, plan, _ = run(store, tmp, ["t0:0.5", "-t1", "t2"])
    assert [t.weight for t in plan.terms] == [0.5, -0.3, 0.3]
    for k in SHAPES:
        ref = base[k] + (0.5 * taus[0][k] - 0.3 * taus[1][k] + 0.3 * taus[2][k])
        assert torch.allclose(out[k], ref, atol=1e-6)
    assert torch.equal(out["position_ids"], base["position_ids"])
    out, plan, _ = run(store, tmp, ["-t1"], name="neg.safetensors", scale=0.7)
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] - 0.7 * taus[1][k], atol=1e-6)


def _flat(tau: dict) -> torch.Tensor:
    return torch.cat([tau[k].reshape(-1) for k in sorted(SHAPES)])


def _unflat(vec: torch.Tensor) -> dict:
    out, i = {}, 0
    for k in sorted(SHAPES):
        n = torch.Size(SHAPES[k]).numel()
        out[k] = vec[i:i + n].reshape(SHAPES[k])
        i += n
    return out


def _ref_trim(x: torch.Tensor, density: float) -> torch.Tensor:
    k = topk_count(x.numel(), density)
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.sort(-x.abs().reshape(-1), stable=True).indices[:k]] = True
    return x * keep.reshape(x.shape)


def _ref_ties(xs: list[torch.Tensor], weights=None, normalize: bool = True) -> torch.Tensor:
    """mergekit's TIES merge of weighted trimmed tensors: sign of the sum (0 -> +1), agreeing
    entries summed and, normalized, divided by their terms' summed |weight|."""
    stack = torch.stack(xs)
    w = torch.tensor(weights or [1.0] * len(xs)).abs().reshape(-1, *[1] * xs[0].dim())
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stack) == sign
    total = (stack * agree).sum(0)
    if not normalize:
        return total
    den = (w * agree).sum(0)
    return torch.where(den > 0, total / den.clamp(min=1e-30), 0.0)


def test_ties_global_scope_matches_ties_on_concatenated_vectors(world):
    tmp, store, base, taus = world
    out, plan, _ = run(store, tmp, ["t0", "t1", "-t2:0.5"], method="ties", density=0.3, scale=0.8)
    assert plan.params.scope == "global"
    xs = [_ref_trim(_flat(taus[0]), 0.3), _ref_trim(_flat(taus[1]), 0.3),
          -0.5 * _ref_trim(_flat(taus[2]), 0.3)]
    merged = _unflat(_ref_ties(xs, [1.0, 1.0, -0.5]))
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + 0.8 * merged[k], atol=1e-6), k
    out, _, _ = run(store, tmp, ["t0", "t1", "-t2:0.5"], name="sum.safetensors", method="ties",
                    density=0.3, scale=0.8, normalize=False)  # the disjoint sum (FusionBench)
    merged = _unflat(_ref_ties(xs, normalize=False))
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + 0.8 * merged[k], atol=1e-6), k


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_ties_global_with_ties_at_the_threshold_in_several_tensors(tmp_path, monkeypatch, chunk):
    """Quantised vectors: the threshold value occurs in several tensors and only some of its
    entries are kept: the first ones in key order, then row-major (a stable sort of the
    concatenation), with many slices per tensor or one."""
    from tvtool.vectors import merge_stream

    monkeypatch.setattr(merge_stream, "CHUNK", chunk)
    base = {k: _rand(s, i) for i, (k, s) in enumerate(SHAPES.items())}
    save_safetensors(tmp_path / "base.safetensors", base)
    store, taus = Store(), []
    for t in range(3):
        tau = {k: (_rand(s, 10 * t + i) * 2).round() / 20
               for i, (k, s) in enumerate(SHAPES.items())}
        store.set_ref(f"q{t}", save_tensor_object(store, "vector", tau).digest)
        taus.append(tau)
    out, _, _ = run(store, tmp_path, ["q0", "q1", "q2:0.5"], method="ties", density=0.3)
    xs = [_ref_trim(_flat(taus[0]), 0.3), _ref_trim(_flat(taus[1]), 0.3),
          0.5 * _ref_trim(_flat(taus[2]), 0.3)]
    merged = _unflat(_ref_ties(xs, [1.0, 1.0, 0.5]))
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + merged[k], atol=1e-6), k


def test_ties_global_cut_after_an_empty_tensor(tmp_path, monkeypatch):
    """The last kept tie in the first slice of a tensor that starts where an empty one does."""
    from tvtool.vectors import merge_stream

    monkeypatch.setattr(merge_stream, "CHUNK", 7)
    base = {"a.empty": torch.zeros(0), "b.w": torch.zeros(64)}
    save_safetensors(tmp_path / "base.safetensors", base)
    tau = torch.full((64,), 0.5)
    tau[:10] = 1.0  # ten ties at the threshold; int(0.078 * 64) = 4 of them kept
    store = Store()
    store.set_ref("e", save_tensor_object(store, "vector", {**base, "b.w": tau}).digest)
    out, _, _ = run(store, tmp_path, ["e"], method="ties", density=0.078)
    assert torch.equal(out["b.w"], torch.where(torch.arange(64) < 4, 1.0, 0.0))
    assert out["a.empty"].numel() == 0


def test_ties_tensor_scope_trims_each_tensor_and_differs_from_global(world):
    tmp, store, base, taus = world
    out, _, _ = run(store, tmp, ["t0", "t1"], method="ties", scope="tensor", density=0.25)
    glob, _, _ = run(store, tmp, ["t0", "t1"], name="g.safetensors", method="ties", density=0.25)
    for k in SHAPES:
        ref = _ref_ties([_ref_trim(taus[0][k], 0.25), _ref_trim(taus[1][k], 0.25)])
        assert torch.allclose(out[k], base[k] + ref, atol=1e-6), k
    assert any(not torch.equal(out[k], glob[k]) for k in SHAPES)


def test_magnitude_keeps_global_top_density(world):
    tmp, store, base, taus = world
    out, _, _ = run(store, tmp, ["t0", "t1:2"], method="magnitude", density=0.1)
    kept = [_unflat(_ref_trim(_flat(t), 0.1)) for t in taus[:2]]
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + 0.3 * kept[0][k] + 2 * kept[1][k], atol=1e-6)


def _ref_dare(tau: dict, digest: str, p: float, seed: int) -> dict:
    out = {}
    for k, x in tau.items():
        g = torch.Generator().manual_seed(dare_seed(seed, digest, k))
        keep = torch.rand(x.shape, generator=g) >= p
        out[k] = torch.where(keep, x / (1 - p), 0.0)
    return out


def test_dare_then_sum_and_ties_deterministic(world):
    tmp, store, base, taus = world
    d = [store.resolve(f"t{i}") for i in range(2)]
    out, _, r1 = run(store, tmp, ["t0", "t1"], method="dare", drop=0.5, seed=3)
    dd = [_ref_dare(taus[i], d[i], 0.5, 3) for i in range(2)]
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + 0.3 * (dd[0][k] + dd[1][k]), atol=1e-6)
    _, _, r2 = run(store, tmp, ["t0", "t1"], name="again.safetensors", method="dare", drop=0.5,
                   seed=3)
    assert r1.files[0].read_bytes() == r2.files[0].read_bytes()
    _, _, r3 = run(store, tmp, ["t0", "t1"], name="s4.safetensors", method="dare", drop=0.5,
                   seed=4)
    assert r1.files[0].read_bytes() != r3.files[0].read_bytes()
    out, _, _ = run(store, tmp, ["t0", "t1"], name="dt.safetensors", method="dare", drop=0.5,
                    seed=3, then="ties", density=0.4)
    merged = _unflat(_ref_ties([_ref_trim(_flat(x), 0.4) for x in dd]))
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + merged[k], atol=1e-6)


def test_mask_method_applies_each_terms_mask_and_negative_weight_forgets(world):
    tmp, store, base, taus = world
    d0, d1 = store.resolve("t0"), store.resolve("t1")
    m0 = {k: (torch.rand(s, generator=torch.Generator().manual_seed(7)) > 0.5)
          for k, s in SHAPES.items()}
    m1 = {k: (torch.rand(s) > 0.7).to(torch.uint8) for k, s in SHAPES.items() if k != "head.weight"}
    mk0 = save_tensor_object(store, "mask", m0, inputs=[d0], params={"vector": d0, "density": 0.5})
    mk1 = save_tensor_object(store, "mask", m1, inputs=[d1], params={"vector": d1, "density": 0.3})
    out, plan, _ = run(store, tmp, ["t0:0.5", "-t1"], method="mask", scale=1.0,
                       masks=[mk1.digest, mk0.digest])
    assert [t.mask for t in plan.terms] == [mk0.digest, mk1.digest]
    for k in SHAPES:
        second = taus[1][k] * m1[k] if k in m1 else torch.zeros(SHAPES[k])  # absent: dropped
        ref = base[k] + 0.5 * taus[0][k] * m0[k] - second
        assert torch.allclose(out[k], ref, atol=1e-6), k
    with pytest.raises(TvtoolError, match="no --mask"):
        run(store, tmp, ["t0", "t2"], name="x.safetensors", method="mask", masks=[mk0.digest])
    with pytest.raises(TvtoolError, match="only used with --method mask"):
        run(store, tmp, ["t0"], name="x.safetensors", masks=[mk0.digest])


@pytest.mark.parametrize("granularity,partitions", [("tensor", 1), ("layer", 1), ("task", 1),
                                                    ("tensor", 3)])
def test_learned_coefficients_blockwise_and_partitions(world, granularity, partitions):
    tmp, store, base, taus = world
    digests = [store.resolve(f"t{i}") for i in range(3)]
    shapes = {k: SHAPES[k] for k in sorted(SHAPES) if k != "head.weight"}  # head: not learned
    layout = CoefsLayout(vectors=digests, blocks=make_blocks(shapes, granularity, partitions),
                         granularity=granularity, partitions=partitions, partition_seed=5)
    coefs = torch.randn(3, layout.n_groups, generator=torch.Generator().manual_seed(9))
    c = save_tensor_object(store, "coefs", {"coefs": coefs}, inputs=digests,
                           params={"layout": layout.model_dump()})
    out, plan, _ = run(store, tmp, [], coefs=c.digest)
    assert plan.coefs == c.digest
    off = 0
    for b in layout.blocks:
        for k in b.keys:
            ref = base[k].clone()
            for t in range(3):
                if b.groups == 1:
                    ref += coefs[t, off] * taus[t][k]
                else:
                    ids = partition_ids(k, SHAPES[k], b.groups, 5)
                    ref += coefs[t, off:off + b.groups][ids] * taus[t][k]
            assert torch.allclose(out[k], ref, atol=1e-6), k
        off += b.groups
    assert torch.equal(out["head.weight"], base["head.weight"])
    with pytest.raises(TvtoolError, match="drop the TERMs"):
        run(store, tmp, ["t0"], name="y.safetensors", coefs=c.digest)


def test_output_dtype_filters_and_byte_identical_reruns(world):
    tmp, store, base, taus = world
    out, _, r1 = run(store, tmp, ["t0", "t1"], dtype="fp16", exclude=[r"bias$"])
    ref32, _, _ = run(store, tmp, ["t0", "t1"], name="o32.safetensors", exclude=[r"bias$"])
    for k in SHAPES:
        assert out[k].dtype == torch.float16
        if k.endswith("bias"):
            assert torch.equal(out[k], base[k].half())
        else:
            assert torch.equal(out[k], ref32[k].half())
    assert out["position_ids"].dtype == torch.int64
    _, _, r2 = run(store, tmp, ["t0", "t1"], name="o2.safetensors", dtype="fp16",
                   exclude=[r"bias$"])
    assert r1.files[0].read_bytes() == r2.files[0].read_bytes()


def test_shards_index_and_merge_object(world):
    tmp, store, base, taus = world
    single, _, r1 = run(store, tmp, ["t0"], name="model.safetensors")
    (tmp / "sh").mkdir()
    sharded, plan, r2 = run(store, tmp, ["t0"], name="sh/model.safetensors", shard_size=400)
    assert r2.index == tmp / "sh" / "model.safetensors.index.json"
    n = len(r2.files)
    assert n > 1 and r2.files[0].name == f"model-00001-of-{n:05d}.safetensors"
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    m = store.manifest(r2.digest)
    assert m.kind == "merge" and m.inputs == [store.resolve("t0")]
    assert m.params["files"][-1] == "model.safetensors.index.json"
    assert store.read_json(r2.digest)["terms"][0]["vector"] == store.resolve("t0")


@pytest.mark.parametrize("method,kw,checkpoint", [
    ("ties", {}, False),  # sliced reads: hashed as streamed
    ("ties", {}, True),
    ("ties", {"scope": "tensor"}, True),  # whole tensors: hashed as streamed, rows in parallel
    ("sum", {}, True),
    ("magnitude", {"density": 0.5}, True),  # not stacked: the checkpoint hashed on a thread
])
def test_base_hashed_while_merging_gives_the_same_bytes(world, method, kw, checkpoint):
    tmp, store, base, taus = world
    terms = ["t0", "-t1"]
    if checkpoint:
        terms[1] = "-" + str(_checkpoints(tmp, base, taus[1:2])[0])
    _, plan1, r1 = run(store, tmp, terms, method=method, **kw)
    req = MergeRequest(base=tmp / "base.safetensors", out=tmp / "late.safetensors",
                       terms=parse_terms(terms), method=method, **kw)
    plan = plan_merge(store, req, hash_base=False)
    assert plan.fingerprint is None and plan.digest == "0" * 64
    r2 = execute_merge(store, plan)
    assert plan.fingerprint == plan1.fingerprint and r2.digest == r1.digest
    assert [t.fingerprint for t in plan.terms] == [t.fingerprint for t in plan1.terms]
    assert r2.files[0].read_bytes() == r1.files[0].read_bytes()


def test_rebuild_from_recipe_is_byte_identical(world):
    tmp, store, base, taus = world
    _, _, r1 = run(store, tmp, ["t0:0.4", "-t1"], method="ties", scope="tensor")
    req = request_from_recipe(store, r1.digest[:10], tmp / "base.safetensors",
                              tmp / "rebuilt.safetensors")
    r2 = execute_merge(store, plan_merge(store, req))
    assert r2.digest == r1.digest
    assert r2.files[0].read_bytes() == r1.files[0].read_bytes()
    save_safetensors(tmp / "other.safetensors", {k: v + 1 for k, v in base.items()})
    req = request_from_recipe(store, r1.digest, tmp / "other.safetensors", tmp / "z.safetensors")
    with pytest.raises(TvtoolError, match="not the recipe's base"):
        plan_merge(store, req)
    plan = plan_merge(store, req, hash_base=False)  # found out at the end: nothing is left
    with pytest.raises(TvtoolError, match="not the recipe's base"):
        execute_merge(store, plan)
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith((".z", "z"))) == []


def test_bad_inputs(world):
    tmp, store, base, taus = world
    odd = dict(taus[0])
    odd["extra.weight"] = torch.ones(2)
    odd["head.weight"] = torch.ones(8, 5)
    store.set_ref("odd", save_tensor_object(store, "vector", odd).digest)
    with pytest.raises(TvtoolError, match=r"extra\.weight.*head\.weight.*allow-missing"):
        run(store, tmp, ["odd"])
    out, plan, _ = run(store, tmp, ["odd"], allow_missing=True)
    assert len(plan.skipped) == 2
    assert torch.equal(out["head.weight"], base["head.weight"])
    assert torch.allclose(out["blocks.1.mlp.bias"], base["blocks.1.mlp.bias"]
                          + taus[0]["blocks.1.mlp.bias"])
    with pytest.raises(TvtoolError, match="exists; use --force"):
        run(store, tmp, ["t0"])
    run(store, tmp, ["t0"], force=True)
    with pytest.raises(TvtoolError, match="nothing to merge"):
        run(store, tmp, [], name="n.safetensors")
    with pytest.raises(TvtoolError, match="no ref or object"):
        run(store, tmp, ["nope"], name="n.safetensors")
    with pytest.raises(TvtoolError, match="does not exist"):
        run(store, tmp, ["t0"], name="no/such/dir.safetensors")
    with pytest.raises(TvtoolError, match="density"):
        run(store, tmp, ["t0"], name="n.safetensors", method="ties", density=2.0)
    assert not (tmp / "n.safetensors").exists()


@pytest.mark.parametrize("method", ["sum", "ties", "magnitude"])
def test_slices_and_whole_tensors_give_identical_bytes(world, monkeypatch, method):
    from tvtool.vectors import merge_stream

    tmp, store, base, taus = world
    monkeypatch.setattr(merge_stream, "CHUNK", 7)  # many ragged slices per tensor
    kw = {} if method == "sum" else {"density": 0.3}
    _, _, sliced = run(store, tmp, ["t0", "-t1:0.7", "t2"], name="s.safetensors", method=method,
                       **kw)
    monkeypatch.setattr(merge_stream.SliceReader, "of", classmethod(lambda cls, r, stored: None))
    _, _, whole = run(store, tmp, ["t0", "-t1:0.7", "t2"], name="w.safetensors", method=method,
                      **kw)
    assert sliced.files[0].read_bytes() == whole.files[0].read_bytes()


@pytest.mark.parametrize("fallback", [False, True])
def test_ties_global_sampled_band_and_its_fallback_give_identical_bytes(world, monkeypatch,
                                                                        fallback):
    from tvtool.vectors import merge_rows
    from tvtool.vectors.methods import topk

    tmp, store, base, taus = world
    terms = ["t0", "-t1:0.7", str(_checkpoints(tmp, base, taus[2:])[0])]
    _, _, exact = run(store, tmp, terms, name="e.safetensors", method="ties", density=0.3)
    monkeypatch.setattr(merge_rows, "SAMPLE", 64)  # a sample of pages, not the whole vector
    monkeypatch.setattr(merge_rows, "PAGE", 4)
    if fallback:
        monkeypatch.setattr(topk.BandKth, "result", lambda self: None)
    _, _, sampled = run(store, tmp, terms, name="s.safetensors", method="ties", density=0.3)
    assert sampled.files[0].read_bytes() == exact.files[0].read_bytes()


def test_torch_and_bf16_bases(world):
    tmp, store, base, taus = world
    torch.save({"module." + k: v for k, v in base.items()}, tmp / "base.pt")
    req = MergeRequest(base=tmp / "base.pt", out=tmp / "pt.safetensors",
                       terms=parse_terms(["t0", "t1:-1"]))
    res = execute_merge(store, plan_merge(store, req))
    with open_checkpoint(res.files[0]) as r:
        assert sorted(r.keys()) == sorted(base)
        for k in SHAPES:
            assert torch.allclose(r.get(k), base[k] + 0.3 * taus[0][k] - taus[1][k], atol=1e-6)
    save_safetensors(tmp / "bf16.safetensors", {k: v.to(torch.bfloat16) if v.is_floating_point()
                                                else v for k, v in base.items()})
    req = MergeRequest(base=tmp / "bf16.safetensors", out=tmp / "bf.safetensors",
                       terms=parse_terms(["t0"]))
    res = execute_merge(store, plan_merge(store, req))
    with open_checkpoint(res.files[0]) as r:
        for k in SHAPES:
            ref = (base[k].to(torch.bfloat16).float() + taus[0][k]).to(torch.bfloat16)
            assert r.get(k).dtype == torch.bfloat16 and torch.equal(r.get(k), ref)


def test_dare_then_ties_does_not_trim_unless_density_is_given(world):
    tmp, store, base, taus = world
    d = [store.resolve(f"t{i}") for i in range(2)]
    dd = [_ref_dare(taus[i], d[i], 0.5, 3) for i in range(2)]
    out, plan, _ = run(store, tmp, ["t0", "t1"], name="dt0.safetensors", method="dare", drop=0.5,
                       seed=3, then="ties")
    merged = _unflat(_ref_ties([_flat(x) for x in dd]))  # mergekit's dare_ties: no top-k
    for k in SHAPES:
        assert torch.allclose(out[k], base[k] + merged[k], atol=1e-6)
    kept = sum(int((out[k] != base[k]).sum()) for k in SHAPES)
    assert kept > 0.6 * sum(torch.Size(s).numel() for s in SHAPES.values())  # ~75%, not 20%


def _checkpoints(tmp, base, taus):
    """Fine-tuned checkpoints base + tau_t, and their extracted vectors."""
    paths = []
    for t, tau in enumerate(taus):
        ft = {k: (v + tau[k] if k in tau else v) for k, v in base.items()}
        paths.append(tmp / f"ft{t}.safetensors")
        save_safetensors(paths[-1], ft)
    return paths


@pytest.mark.parametrize("method,params", [
    ("sum", {}), ("ties", {"density": 0.3}), ("ties", {"scope": "tensor"}),
    ("magnitude", {"density": 0.5}), ("dare", {"drop": 0.3}), ("breadcrumbs", {}),
    ("model_stock", {}),
])
def test_checkpoint_terms_equal_their_extracted_vectors(world, method, params):
    tmp, store, base, taus = world
    paths = _checkpoints(tmp, base, taus)
    digests = [extract_vector(store, tmp / "base.safetensors", p).digest for p in paths]
    stored, _, _ = run(store, tmp, [f"{digests[0]}:0.5", digests[1], f"-{digests[2]}"],
                       name="v.safetensors", method=method, **params)
    mixed, plan, res = run(store, tmp, [f"{paths[0]}:0.5", digests[1], f"-{paths[2]}"],
                           name="c.safetensors", method=method, **params)
    for k in stored:
        if method == "dare":  # draws are seeded by the term's identity (digest vs sha256)
            assert stored[k].shape == mixed[k].shape
        else:
            assert torch.equal(stored[k], mixed[k]), k
    recipe = store.read_json(res.digest)
    assert recipe["terms"][0]["checkpoint"] == plan.terms[0].fingerprint
    assert recipe["terms"][0]["path"] == str(paths[0].resolve())
    assert recipe["terms"][1]["vector"] == digests[1]
    from tvtool.checkpoints.readers import checkpoint_fingerprint

    assert plan.terms[0].fingerprint == checkpoint_fingerprint(paths[0])


def test_checkpoint_recipe_rebuilds_and_checks_the_file(world):
    tmp, store, base, taus = world
    paths = _checkpoints(tmp, base, taus)
    _, _, r1 = run(store, tmp, [str(paths[0]), "t1"], name="a.safetensors", method="ties")
    req = request_from_recipe(store, r1.digest, tmp / "base.safetensors", tmp / "b.safetensors")
    r2 = execute_merge(store, plan_merge(store, req, hash_base=False))
    assert r2.files[0].read_bytes() == r1.files[0].read_bytes()
    save_safetensors(paths[0], {k: v * 3 for k, v in base.items()}, force=True)
    req = request_from_recipe(store, r1.digest, tmp / "base.safetensors", tmp / "c.safetensors")
    with pytest.raises(TvtoolError, match="not the recipe's checkpoint"):
        plan_merge(store, req)


def test_name_tags_the_recipe(world):
    tmp, store, base, taus = world
    _, _, r = run(store, tmp, ["t0"], name="n.safetensors")
    req = MergeRequest(base=tmp / "base.safetensors", out=tmp / "tagged.safetensors",
                       terms=parse_terms(["t0"]), name="merges/first")
    res = execute_merge(store, plan_merge(store, req))
    assert store.resolve("merges/first") == res.digest == r.digest


def test_crafted_recipes_give_one_clear_error(world):
    tmp, store, base, taus = world
    _, _, r = run(store, tmp, ["t0", "t1"], method="ties")
    good = store.read_json(r.digest)
    for bad, match in (
        ({**good, "method": {"method": "ties", "density": 7}}, "density"),
        ({**good, "method": {"method": "nope"}}, "does not match"),
        ({**good, "terms": [{"vector": "x", "weight": 1.0}]}, "terms"),
        ({**good, "terms": [{**good["terms"][0], "weight": 1e308}]}, "weight"),
        ({**good, "scale": "lots"}, "scale"),
        ({**good, "format": "tvtool.merge/1"}, "older tvtool"),
        ([1, 2], "not a merge recipe"),
    ):
        d = store.put_json(bad, kind="merge").digest
        with pytest.raises(TvtoolError, match=match):
            request_from_recipe(store, d, tmp / "base.safetensors", tmp / "z.safetensors")


@pytest.mark.parametrize("method,terms", [("slerp", ["t0", "t1:0.5"]), ("della", ["t0", "t1"]),
                                          ("model_stock", ["t0", "t1", "t2"]),
                                          ("breadcrumbs", ["t0", "-t2"])])
def test_new_methods_end_to_end_and_rebuild(world, method, terms):
    tmp, store, base, taus = world
    out, plan, r1 = run(store, tmp, terms, method=method)
    assert plan.params.method == method and set(out) == set(base)
    assert any(not torch.equal(out[k], base[k]) for k in SHAPES)
    req = request_from_recipe(store, r1.digest, tmp / "base.safetensors", tmp / "again.safetensors")
    assert execute_merge(store, plan_merge(store, req)).files[0].read_bytes() == \
        r1.files[0].read_bytes()
    if method in ("slerp", "model_stock"):
        with pytest.raises(TvtoolError, match="exactly 2|at least 2"):
            run(store, tmp, ["t0"], name="one.safetensors", method=method)


def _plain_ties(base, taus, weights, density, scale, normalize):
    """TIES of one tensor in plain torch, in the order of operations of the paper's steps:
    trim each tau to its top int(density * n) by |tau| (stable sort: the lower index wins among
    equals), weight, elect sign(sum) (0 -> +), sum the agreeing entries, divide by their terms'
    summed |weight|, base + scale * that."""
    ys = []
    for tau, w in zip(taus, weights, strict=True):
        flat = tau.reshape(-1)
        keep = torch.zeros(flat.numel())
        keep[torch.sort(-flat.abs(), stable=True).indices[:topk_count(flat.numel(), density)]] = 1
        y = flat * keep
        ys.append(y * torch.tensor(w, dtype=torch.float32) if w != 1.0 else y)
    total_sum = ys[0].clone()
    for y in ys[1:]:
        total_sum = total_sum + y
    s = torch.where(total_sum >= 0, 1.0, -1.0)
    total, den = torch.zeros_like(s), torch.zeros_like(s)
    for y, w in zip(ys, weights, strict=True):
        agree = y * s > 0
        total = total + torch.where(agree, y, 0.0)
        den = den + agree.float() * torch.tensor(abs(w), dtype=torch.float32)
    delta = total / torch.where(den > 0, den, 1.0) if normalize else total
    return base.reshape(-1).add(delta, alpha=scale).reshape(base.shape)


@pytest.mark.parametrize("weights,density,scale,normalize", [
    ([1.0, 1.0, 1.0, 1.0], 0.5, 1.0, True),
    ([0.5, 1.0, -1.5], 0.3, 0.7, True),
    ([0.5, -1.0, 2.0], 0.2, 1.3, False),
])
def test_ties_per_tensor_from_checkpoints_equals_plain_torch(tmp_path, weights, density, scale,
                                                             normalize):
    """Bit for bit (up to the sign of zeros) on tensors that take every path: the in-place
    selection (past 2^17 entries), quantised deltas whose ties at the threshold are cut inside
    a column slice, exact zeros, small tensors."""
    shapes = {"big.weight": (600, 300), "mid.weight": (300, 500), "small.weight": (40, 30),
              "small.bias": (30,)}
    g = torch.Generator().manual_seed(len(weights))
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["big.weight"].view(-1)[::13] = -0.0
    save_safetensors(tmp_path / "base.safetensors", base)
    taus, terms = [], []
    for t, w in enumerate(weights):
        tau = {k: (torch.randn(s, generator=g) * 20).round() / 256 for k, s in shapes.items()}
        ft = {k: base[k] + tau[k] for k in shapes}
        save_safetensors(tmp_path / f"ft{t}.safetensors", ft)
        taus.append({k: ft[k] - base[k] for k in shapes})  # what the merge computes
        terms.append(f"{tmp_path / f'ft{t}.safetensors'}:{w}")
    out, _, _ = run(Store(), tmp_path, terms, method="ties", scope="tensor", density=density,
                    scale=scale, normalize=normalize)
    for k in shapes:
        want = _plain_ties(base[k], [tau[k] for tau in taus], weights, density, scale, normalize)
        assert torch.equal(out[k], want), k
