"""`tvtool inspect`: statistics checked against plain torch, streaming order, plot, coefs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reader_helpers import DictReader

from tvtool.store.store import Store
from tvtool.vectors.blocks import CoefsLayout, coef_for_key, make_blocks
from tvtool.vectors.stored import save_tensor_object

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"a.weight": (6, 5), "b.bias": (7,), "c.weight": (3, 4, 2), "d.scalar": ()}


def vec(seed: int, drop: str | None = None, sparse: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in SHAPES.items():
        if k == drop:
            continue
        t = torch.randn(s, generator=g)
        if sparse:
            t[torch.rand(s, generator=g) < sparse] = 0.0
        out[k] = t
    return out


@pytest.fixture
def three() -> dict[str, dict[str, torch.Tensor]]:
    """Three stored vectors: one sparse, one lacking a tensor, one correlated with the first."""
    store = Store()
    v1 = vec(1, sparse=0.3)
    v2 = vec(2, drop="b.bias")
    v3 = {k: 0.5 * v + 0.1 * torch.randn(v.shape) for k, v in v1.items()}
    vs = {"t/one": v1, "t/two": v2, "t/three": v3}
    for name, tensors in vs.items():
        store.set_ref(name, save_tensor_object(store, "vector", tensors).digest)
    return vs


def flat(v: dict[str, torch.Tensor]) -> torch.Tensor:
    """The whole vector over all SHAPES keys, zeros where a tensor is missing."""
    parts = [v[k].reshape(-1) if k in v else torch.zeros(SHAPES[k]).reshape(-1) for k in SHAPES]
    return torch.cat(parts).double()


def run_json(invoke, *args: str) -> dict:
    r = invoke("inspect", *args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_block_and_vector_stats_match_torch(invoke, three) -> None:
    doc = run_json(invoke, "t/one", "t/two", "t/three")
    assert [v["name"] for v in doc["vectors"]] == ["t/one", "t/two", "t/three"]
    for v in doc["vectors"]:
        tensors = three[v["name"]]
        assert {b["name"] for b in v["blocks"]} == set(tensors)
        for b in v["blocks"]:
            t = tensors[b["name"]].double()
            assert b["numel"] == t.numel()
            assert b["l2"] == pytest.approx(float(torch.linalg.norm(t)), rel=1e-6)
            assert b["rms"] == pytest.approx(float(t.square().mean().sqrt()), rel=1e-6)
            assert b["max_abs"] == pytest.approx(float(t.abs().max()), rel=1e-6)
            assert b["frac_zero"] == pytest.approx(float((t == 0).double().mean()))
        whole = torch.cat([t.reshape(-1).double() for t in tensors.values()])
        assert v["l2"] == pytest.approx(float(torch.linalg.norm(whole)), rel=1e-6)
        assert v["numel"] == whole.numel()
        assert v["digest"] == Store().resolve(v["name"])
    assert doc["vectors"][0]["frac_zero"] > 0.1


def test_cosine_and_sign_agreement_match_torch(invoke, three) -> None:
    names = ["t/one", "t/two", "t/three"]
    doc = run_json(invoke, *names)
    assert doc["cosine"]["names"] == names
    flats = [flat(three[n]) for n in names]
    for i in range(3):
        for j in range(3):
            expected = float(F.cosine_similarity(flats[i].double(), flats[j].double(), dim=0))
            # float32 chunk products summed in float64 (vectors.gram): about 1e-7 here
            assert doc["cosine"]["matrix"][i][j] == pytest.approx(expected, abs=1e-6)
            a, b = flats[i], flats[j]
            both = (a != 0) & (b != 0)
            same = float((torch.sign(a[both]) == torch.sign(b[both])).double().mean())
            assert doc["sign_agreement"]["matrix"][i][j] == pytest.approx(same)
    assert doc["cosine"]["matrix"][0][2] > 0.9  # the correlated pair
    assert doc.get("per_block_cosine") is None


def test_per_block_cosine(invoke, three) -> None:
    doc = run_json(invoke, "t/one", "t/two", "t/three", "--per-block")
    pb = doc["per_block_cosine"]
    assert pb["pairs"] == [["t/one", "t/two"], ["t/one", "t/three"], ["t/two", "t/three"]]
    by_name = {b["name"]: b["cosine"] for b in pb["blocks"]}
    assert set(by_name) == set(SHAPES)
    for key, cos in by_name.items():
        for (a, b), c in zip(pb["pairs"], cos, strict=True):
            if key not in three[a] or key not in three[b]:
                assert c is None
                continue
            x, y = three[a][key].reshape(-1).double(), three[b][key].reshape(-1).double()
            assert c == pytest.approx(float(F.cosine_similarity(x, y, dim=0)), abs=1e-6)


def test_single_vector_and_human_tables(invoke, three) -> None:
    doc = run_json(invoke, "t/one")
    assert doc["cosine"] == {"names": ["t/one"], "matrix": [[1.0]]}
    r = invoke("inspect", "t/one", "t/two", "--top", "2")
    assert r.exit_code == 0 and r.stdout == ""  # people's output goes to stderr
    err = r.stderr
    assert "a.weight" in err and "c.weight" in err  # the two largest blocks
    assert "d.scalar" not in err and "more blocks" in err
    assert "cosine similarity" in err and "sign agreement" in err


def test_digest_prefix_and_errors(invoke, three) -> None:
    digest = Store().resolve("t/one")
    doc = run_json(invoke, digest[:10])
    assert doc["vectors"][0]["name"] == "t/one"  # shown under its ref name
    assert invoke("inspect", "nope").exit_code == 1
    assert "at least 8" in invoke("inspect", "abc").stderr
    assert "give at least one vector" in invoke("inspect").stderr


def test_shape_mismatch_across_vectors(invoke, three) -> None:
    store = Store()
    store.set_ref("odd", save_tensor_object(store, "vector", {"a.weight": torch.ones(5, 6)}).digest)
    r = invoke("inspect", "t/one", "odd")
    assert r.exit_code == 1 and "different shapes" in r.stderr and "a.weight" in r.stderr


def test_streams_one_key_at_a_time() -> None:
    """Each worker reads all vectors' tensors of one key before its next: T tensors per worker
    (two), not T vectors."""
    from tvtool.vectors.stats import Source, inspect_vectors

    log: list[tuple[int, str]] = []

    def reader(i: int) -> DictReader:
        return DictReader(vec(i), on_get=lambda k: log.append((i, k)))

    sources = [Source(f"v{i}", "0" * 64, reader(i)) for i in range(4)]
    inspect_vectors(sources)  # type: ignore[arg-type]
    reading: set[str] = set()  # keys begun and not finished: at most one per worker thread
    reads: dict[str, int] = {}
    for _, k in log:
        reading.add(k)
        reads[k] = reads.get(k, 0) + 1
        assert len(reading) <= 2
        if reads[k] == len(sources):
            reading.remove(k)
    assert len(log) == 4 * len(SHAPES)  # every tensor read once


@pytest.mark.slow
def test_plot(invoke, three, tmp_path: Path) -> None:
    out = tmp_path / "cos.png"
    r = invoke("inspect", "t/one", "t/two", "t/three", "--plot", out)
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = invoke("inspect", "t/one", "--plot", out)
    assert r.exit_code == 1 and "--force" in r.stderr
    assert invoke("inspect", "t/one", "--plot", out, "--force").exit_code == 0
    assert "use a .png" in invoke("inspect", "t/one", "--plot", tmp_path / "x.gif").stderr


def test_plot_without_matplotlib(invoke, three, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = invoke("inspect", "t/one", "--plot", tmp_path / "x.png")
    assert r.exit_code == 1 and "tvtool[plot]" in r.stderr
    assert not (tmp_path / "x.png").exists()


def _write_coefs(vs: dict[str, dict[str, torch.Tensor]], names: list[str], partitions: int) -> str:
    store = Store()
    digests = [store.resolve(n) for n in names]
    shapes = {k: SHAPES[k] for k in SHAPES}
    layout = CoefsLayout(
        vectors=digests,
        blocks=make_blocks(shapes, "tensor", partitions),
        partitions=partitions,
        partition_seed=3,
    )
    coefs = torch.linspace(-1.0, 1.5, len(names) * layout.n_groups).reshape(len(names), -1)
    m = save_tensor_object(
        store, "coefs", {"coefs": coefs}, params={"layout": layout.model_dump()}, inputs=digests
    )
    store.set_ref("mix", m.digest)
    return m.digest


@pytest.mark.parametrize("partitions", [1, 3])
def test_coefs_table(invoke, three, partitions: int) -> None:
    names = ["t/one", "t/two"]
    _write_coefs(three, names, partitions)
    from tvtool.vectors.stored import load_tensor_object

    manifest, t = load_tensor_object(Store(), "mix", "coefs")
    layout = CoefsLayout.model_validate(manifest.params["layout"])
    coefs = t["coefs"].double()
    doc = run_json(invoke, "--coefs", "mix")  # the vectors come from the layout
    table = doc["coefs"]
    assert table["name"] == "mix" and table["vectors"] == names
    assert [v["name"] for v in doc["vectors"]] == names
    index = layout.key_index()
    for blk, row in zip(layout.blocks, table["blocks"], strict=True):
        assert row["name"] == blk.name and row["groups"] == blk.groups
        b, off = index[blk.keys[0]]
        contrib = []
        for r, n in enumerate(names):
            cols = coefs[r, off : off + blk.groups]
            assert row["coef"][r] == pytest.approx(float(cols.mean()))
            total = 0.0
            for k in blk.keys:
                if k in three[n]:
                    c = coef_for_key(coefs[r], k, SHAPES[k], layout)
                    total += float((c * three[n][k].double()).square().sum())
            contrib.append(total**0.5)
        assert row["contribution"] == pytest.approx(contrib, rel=1e-6)
        top = max(range(len(names)), key=lambda i: contrib[i])
        assert row["top"] == names[top]
        assert row["top_share"] == pytest.approx(contrib[top] / sum(contrib))
    assert sum(table["top_counts"].values()) == len(layout.blocks)
    r = invoke("inspect", "t/three", "--coefs", "mix")
    assert r.exit_code == 0 and "contributes most" in r.stderr
    assert "coefficients mix" in r.stderr


def test_coefs_wrong_kind(invoke, three) -> None:
    r = invoke("inspect", "t/one", "--coefs", "t/two")
    assert r.exit_code == 1 and "expected coefs" in r.stderr


@pytest.mark.slow
def test_subprocess_json(three, run_tvtool) -> None:
    out = run_tvtool("inspect", "t/one", "t/three", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["cosine"]["names"] == ["t/one", "t/three"]
    assert doc["vectors"][0]["blocks"][0].keys() >= {"name", "numel", "l2"}


@pytest.mark.parametrize(("pair_bits", "pair_block"), [(1 << 15, 1 << 20), (1, 5), (3, 1 << 20)])
def test_chunked_pass_matches_float64(monkeypatch, pair_bits: int, pair_block: int) -> None:
    """Many ragged column chunks (some with zeros, some without), half-precision rows, a key
    one vector lacks: norms, zeros, max |x|, cosines and sign agreement against float64."""
    from tvtool.vectors import gram
    from tvtool.vectors.stats import Source, inspect_vectors

    monkeypatch.setattr(gram, "CHUNK", 7)  # products of 7 columns in slices of 16
    monkeypatch.setattr(gram, "SLICE", 16)
    monkeypatch.setattr(gram, "PAIR_BITS", pair_bits)  # sign bits batched, or counted each slice
    monkeypatch.setattr(gram, "PAIR_BLOCK", pair_block)  # pairwise counts at once, or by rows

    vs = [vec(1, sparse=0.4), vec(2, drop="c.weight"), vec(3)]
    vs[2] = {k: v.half() for k, v in vs[2].items()}
    vs[0]["a.weight"][:, :2] = 0.0  # whole chunks of zeros
    vs[1]["a.weight"][0, 1] = -0.0  # a zero whose sign bit is set
    sources = [Source(f"v{i}", "0" * 64, DictReader(v, copy=True)) for i, v in enumerate(vs)]
    report, _ = inspect_vectors(sources)  # type: ignore[arg-type]
    flats = [flat({k: t.double() for k, t in v.items()}) for v in vs]
    for i, (stats, x) in enumerate(zip(report.vectors, flats, strict=True)):
        assert stats.l2 == pytest.approx(float(x.norm()), rel=1e-6)
        assert stats.max_abs == pytest.approx(float(x.abs().max()), rel=1e-6)
        held = sum(vs[i][k].numel() for k in vs[i])
        assert stats.frac_zero == pytest.approx(1 - float((x != 0).sum()) / held)
        for j, y in enumerate(flats):
            cos = float(F.cosine_similarity(x, y, dim=0))
            assert report.cosine.matrix[i][j] == pytest.approx(cos, abs=1e-6)
            both = (x != 0) & (y != 0)
            same = float((torch.sign(x[both]) == torch.sign(y[both])).double().mean())
            assert report.sign_agreement.matrix[i][j] == pytest.approx(same)


def test_exact_counts_at_full_slice_size() -> None:
    """Stored vectors (positioned slice reads, default slice sizes) over several slices per
    key, zero-free slices and sparse ones, a -0.0 and a vector lacking a key: counts (sign
    agreement, zeros) and max |x| exactly equal to plain torch's, cosines to 1e-6."""
    from tvtool.vectors import gram
    from tvtool.vectors.stats import inspect_store

    g = torch.Generator().manual_seed(7)
    shapes = {"big.weight": (3 * gram.SLICE + 123,), "mid.weight": (97, 1031), "tiny": (5,)}
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    vs = [{k: 0.5 * shared[k] + torch.randn(s, generator=g) for k, s in shapes.items()}
          for _ in range(5)]
    vs[1]["big.weight"][gram.SLICE: gram.SLICE + 5000] = 0.0  # zeros in one slice only
    vs[2]["mid.weight"][torch.rand(97, 1031, generator=g) < 0.7] = 0.0  # TIES-like sparsity
    vs[3]["big.weight"][17] = -0.0
    del vs[4]["mid.weight"]
    store = Store()
    names = []
    for i, v in enumerate(vs):
        store.set_ref(f"x/{i}", save_tensor_object(store, "vector", v).digest)
        names.append(f"x/{i}")
    report = inspect_store(store, names)

    def whole(v):
        return torch.cat([v[k].reshape(-1) if k in v else torch.zeros(s).reshape(-1)
                          for k, s in shapes.items()]).double()

    flats = [whole(v) for v in vs]
    for i, (stats, v) in enumerate(zip(report.vectors, vs, strict=True)):
        held = torch.cat([t.reshape(-1) for t in v.values()])
        assert stats.max_abs == float(held.abs().max())
        assert stats.frac_zero == int((held == 0).sum()) / held.numel()
        for b in stats.blocks:
            t = v[b.name].reshape(-1)
            assert b.max_abs == float(t.abs().max())
            assert b.frac_zero == int((t == 0).sum()) / t.numel()
        for j, y in enumerate(flats):
            x = flats[i]
            cos = float(F.cosine_similarity(x, y, dim=0))
            assert report.cosine.matrix[i][j] == pytest.approx(cos, abs=1e-6)
            both = (x != 0) & (y != 0)
            same = int((torch.sign(x[both]) == torch.sign(y[both])).sum())
            assert report.sign_agreement.matrix[i][j] == same / int(both.sum())
