"""`tvtool demo` end to end on the small zoo, through the CLI: the robust claims hold."""

from __future__ import annotations

import json

import pytest
from zoo_fixture import small_zoo  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(small_zoo, tmp_path_factory):  # noqa: F811
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
