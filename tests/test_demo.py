"""`tvtool demo` end to end on the small zoo, through the CLI: the robust claims hold."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(small_zoo, tmp_path_factory):
    """One `tvtool demo --small --json` run next to the cached zoo (its store is fresh)."""
    from typer.testing import CliRunner

    from tvtool.cli.app import app

    out = small_zoo.root.parent
    res = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--small", "--json"], catch_exceptions=False
    )
    return out, res


def test_demo_json_document(demo_run):
    out, res = demo_run
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["seconds"] > 0 and doc["size"] == "small"
    assert [c["id"] for c in doc["claims"]] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(c["held"], bool) and c["text"] for c in doc["claims"])
    assert doc["table"]["headers"][:4] == ["domain", "role", "zero-shot", "fine-tuned"]
    assert len(doc["table"]["rows"]) == len(doc["domains"]) + 1  # + the mean row
    for d in doc["targets"]:
        row = doc["domains"][d]
        for key in ("zeroshot", "best_isotropic", "atlas", "linear_probe", "entropy", "selected"):
            assert 0 <= row[key] <= 100
        assert row["selected_bytes"] < row["atlas_bytes"]
    for d in doc["tasks"]:
        row = doc["domains"][d]
        assert 0 <= row["attn_addition"] <= 100 and 0 <= row["attn_finetuned"] <= 100
    att = doc["attention"]
    assert att["pairs"] and all(
        0 <= x <= 2 for k in ("full", "attention") for x in att["xi_pairs"][k]
    )
    assert doc["summary"]["attention"]["attention"]["xi"] == pytest.approx(att["xi"]["attention"])
    assert "attn add." in doc["table"]["headers"]
    assert (out / "report.md").read_text().startswith("# tvtool demo report")
    assert json.loads((out / "results.json").read_text())["claims"] == doc["claims"]
    assert (out / "cosine.png").stat().st_size > 0
    stages = {c["stage"] for c in doc["commands"]}
    assert {"extract", "inspect", "addition", "negation", "attention"} <= stages
    assert any("--disentanglement digits-attn/" in c["command"] for c in doc["commands"])
    verbs = {c["command"].split()[1] for c in doc["commands"]}
    assert {"extract", "inspect", "select", "compose", "merge", "eval"} <= verbs
    assert "claim 1:" in res.stderr and "aTLAS 16" in res.stderr


def test_robust_claims_hold(demo_run):
    """Claims 1 (fine-tuning helps) and 4 (16-shot aTLAS beats zero-shot and the best
    isotropic scale on every held-out domain) hold even on the small zoo."""
    _, res = demo_run
    claims = {c["id"]: c["held"] for c in json.loads(res.stdout)["claims"]}
    assert claims[1] and claims[4]


def test_attention_vectors_are_zero_outside_attention(demo_run, small_zoo):
    """digits-attn/<domain> is the attention-only fine-tune minus the base: non-zero exactly on
    the attention in_proj / out_proj tensors (the full vectors also move the MLPs)."""
    from safetensors.torch import load_file

    from tvtool.demo.train import is_attention
    from tvtool.store.store import Store
    from tvtool.vectors.stored import load_tensor_object

    out, res = demo_run
    assert res.exit_code == 0, res.stderr
    store = Store(out / "store")
    base = load_file(str(small_zoo.zeroshot))
    for d in small_zoo.recipe.task_domains:
        ft = load_file(str(small_zoo.attention(d)))
        _, tau = load_tensor_object(store, f"digits-attn/{d}", "vector")
        nonzero = {k for k, t in tau.items() if t.abs().sum() > 0}
        assert nonzero and all(is_attention(k) for k in nonzero)
        assert sum(is_attention(k) for k in tau) == len(nonzero)  # every attention layer moved
        for k in nonzero:  # the stored tensor is the plain difference of the checkpoints
            torch_diff = ft[k].float() - base[k].float()
            assert (tau[k].float() - torch_diff).abs().max() < 1e-6
        _, full = load_tensor_object(store, f"digits/{d}", "vector")
        assert any(t.abs().sum() > 0 for k, t in full.items() if not is_attention(k))


def test_disentanglement_pairs():
    from tvtool.demo.pipeline import pairs

    assert pairs(["a", "b", "c"]) == [("a", "b")]
    assert pairs(["a", "b", "c", "d", "e", "f"]) == [("a", "b"), ("c", "d"), ("e", "f")]


def test_demo_refuses_a_foreign_directory(tmp_path, invoke):
    (tmp_path / "thesis.tex").write_text("precious")
    res = invoke("demo", "--out", tmp_path, "--small")
    assert res.exit_code == 1 and "holds no tvtool demo" in res.stderr
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def _results(**over):
    doms = {
        "a": {
            "role": "task",
            "zeroshot": 10.0,
            "finetuned": 80.0,
            "addition": 30.0,
            "learned_addition": 40.0,
            "attn_finetuned": 70.0,
            "attn_addition": 35.0,
        },
        "b": {
            "role": "task",
            "zeroshot": 50.0,
            "finetuned": 90.0,
            "addition": 40.0,
            "learned_addition": 60.0,
            "negation": 20.0,
            "attn_finetuned": 80.0,
            "attn_addition": 48.0,
        },
        "h": {
            "role": "held-out",
            "zeroshot": 10.0,
            "best_isotropic": 20.0,
            "atlas": 50.0,
            "selected": 47.0,
            "atlas_bytes": 100,
            "selected_bytes": 50,
        },
        "c": {"role": "control", "zeroshot": 90.0, "negation": 85.0},
    }
    for key, value in over.items():
        if "__" not in key:
            continue
        d, k = key.split("__")
        doms[d][k] = value
    return {
        "domains": doms,
        "tasks": ["a", "b"],
        "targets": ["h"],
        "negation": {"target": "b", "control": "c"},
        "attention": {"xi": {"full": over.get("xi_full", 0.5), "attention": 0.3}},
    }


def test_claims_follow_their_definitions():
    from tvtool.demo.report import check_claims

    def held(**over):
        return [c["held"] for c in check_claims(_results(**over))]

    assert held() == [True] * 6
    assert held(a__finetuned=9.0)[0] is False  # one task domain not improved
    assert held(a__addition=0.0, b__addition=50.0)[1] is False  # mean 25 < mean zero-shot 30
    assert held(b__learned_addition=20.0)[1] is False  # learned mean 30 < isotropic 35
    assert held(c__negation=70.0)[2] is False  # control dropped 20 > half the target's 30
    assert held(b__negation=45.0)[2] is False  # target dropped only 5 points
    assert held(h__atlas=19.0)[3] is False  # below the best isotropic scale
    assert held(h__selected=40.0)[4] is False  # 10 points lost
    assert held(h__selected_bytes=80)[4] is False  # 80% of the memory
    # claim 6: normalised addition full (30/80 + 40/90) / 2 = 0.41 < attention (0.5 + 0.6) / 2
    assert held(xi_full=0.25)[5] is False  # full vectors less entangled
    assert held(a__attn_addition=10.0, b__attn_addition=20.0)[5] is False  # (1/7 + 1/4) / 2
    assert held(a__attn_finetuned=35.0)[5] is True  # the ratio counts, not the points


def test_claim_six_summary():
    """The summary holds each kind's xi, mean normalised accuracy and gap (points)."""
    from tvtool.demo.report import check_claims, notes

    r = _results()
    r["attention"].update(scale=0.4, alphas="0:1:0.25", pairs=[["a", "b"]])
    r["negation"].update(scale=1.0, learned={"target": 10.0, "control": 80.0})
    check_claims(r)
    att = r["summary"]["attention"]
    assert att["full"] == pytest.approx(
        {"xi": 0.5, "normalised": (30 / 80 + 40 / 90) / 2, "gap": (50 + 50) / 2}
    )
    assert att["attention"] == pytest.approx(
        {"xi": 0.3, "normalised": (35 / 70 + 48 / 80) / 2, "gap": (35 + 32) / 2}
    )
    line = next(n for n in notes(r) if n.startswith("attn ft./add."))
    assert "full 0.500, attention-only 0.300" in line and "a-b" in line


def test_kept_per_vector_counts_blocks():
    """select --json's keep pairs (vector row, block) become blocks kept per vector label."""
    from tvtool.demo.pipeline import kept_per_vector

    report = {
        "vectors": [{"label": "digits/a"}, {"label": "digits/b"}, {"label": "digits/c"}],
        "keep": [[0, 0], [1, 0], [0, 1], [2, 1], [0, 2], [2, 2]],
    }
    assert kept_per_vector(report) == {"digits/a": 3, "digits/b": 1, "digits/c": 2}


def test_kept_line_and_normalised_summary():
    from tvtool.demo.report import check_claims, notes

    r = _results()
    r["selection_top"], r["selection_score"] = 1, "fisher"
    r["domains"]["h"].update(kept={"digits/a": 1, "digits/b": 3}, blocks=4)
    r["addition"] = {"scale": 0.3}
    r["attention"].update(scale=0.4, alphas="0:1:0.25", pairs=[["a", "b"]])
    r["negation"].update(scale=1.0, learned={"target": 10.0, "control": 80.0})
    check_claims(r)
    assert r["summary"]["normalised"]["learned_addition"] == pytest.approx((40 / 80 + 60 / 90) / 2)
    lines = notes(r)
    kept = next(n for n in lines if "kept" in n and n.startswith("top-1 kept"))
    assert "of the 4 blocks" in kept and "h: b 3, a 1" in kept and "fisher" in kept
    add = next(n for n in lines if n.startswith("addition:"))
    assert "learned 0.58" in add and "isotropic 0.41" in add
