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
    assert [c["id"] for c in doc["claims"]] == [1, 2, 3, 4, 5]
    assert all(isinstance(c["held"], bool) and c["text"] for c in doc["claims"])
    assert doc["table"]["headers"][:4] == ["domain", "role", "zero-shot", "fine-tuned"]
    assert len(doc["table"]["rows"]) == len(doc["domains"]) + 1  # + the mean row
    for d in doc["targets"]:
        row = doc["domains"][d]
        for key in ("zeroshot", "best_isotropic", "atlas", "linear_probe", "entropy", "selected"):
            assert 0 <= row[key] <= 100
        assert row["selected_bytes"] < row["atlas_bytes"]
    assert (out / "report.md").read_text().startswith("# tvtool demo report")
    assert json.loads((out / "results.json").read_text())["claims"] == doc["claims"]
    assert (out / "cosine.png").stat().st_size > 0
    stages = {c["stage"] for c in doc["commands"]}
    assert {"extract", "inspect", "addition", "negation"} <= stages
    verbs = {c["command"].split()[1] for c in doc["commands"]}
    assert {"extract", "inspect", "select", "compose", "merge", "eval"} <= verbs
    assert "claim 1:" in res.stderr and "aTLAS 16" in res.stderr


def test_robust_claims_hold(demo_run):
    """Claims 1 (fine-tuning helps) and 4 (16-shot aTLAS beats zero-shot and the best
    isotropic scale on every held-out domain) hold even on the small zoo."""
    _, res = demo_run
    claims = {c["id"]: c["held"] for c in json.loads(res.stdout)["claims"]}
    assert claims[1] and claims[4]


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
        },
        "b": {
            "role": "task",
            "zeroshot": 50.0,
            "finetuned": 90.0,
            "addition": 40.0,
            "learned_addition": 60.0,
            "negation": 20.0,
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
        d, k = key.split("__")
        doms[d][k] = value
    return {
        "domains": doms,
        "tasks": ["a", "b"],
        "targets": ["h"],
        "negation": {"target": "b", "control": "c"},
    }


def test_claims_follow_their_definitions():
    from tvtool.demo.report import check_claims

    def held(**over):
        return [c["held"] for c in check_claims(_results(**over))]

    assert held() == [True, True, True, True, True]
    assert held(a__finetuned=9.0)[0] is False  # one task domain not improved
    assert held(a__addition=0.0, b__addition=50.0)[1] is False  # mean 25 < mean zero-shot 30
    assert held(b__learned_addition=20.0)[1] is False  # learned mean 30 < isotropic 35
    assert held(c__negation=70.0)[2] is False  # control dropped 20 > half the target's 30
    assert held(b__negation=45.0)[2] is False  # target dropped only 5 points
    assert held(h__atlas=19.0)[3] is False  # below the best isotropic scale
    assert held(h__selected=40.0)[4] is False  # 10 points lost
    assert held(h__selected_bytes=80)[4] is False  # 80% of the memory
