"""eval --grid --control: the task-negation scale search as a CLI feature."""

from __future__ import annotations

import json

from eval_assets import base_args


def test_negation_search_picks_most_forgetting_within_control(env, invoke, vecs):
    r = invoke(
        *base_args(env, "one"), f"{vecs[0]}:-1", "--control", env["dir"] / "two",
        "--grid", "0:2:0.25", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    g = doc["grid"]
    assert g["criterion"] == "negation" and g["control"] == "two"
    base = next(row for row in g["rows"] if row["scale"] == 0)["accuracy"]["two"]
    assert g["base_control_accuracy"] == base
    ok = [row for row in g["rows"] if row["accuracy"]["two"] >= 0.95 * base - 1e-12]
    want = min(ok, key=lambda row: (row["accuracy"]["one"], abs(row["scale"])))["scale"]
    assert doc["scale"] == g["best_scale"] == want
    assert all(row["keeps_control"] == (row in ok) for row in g["rows"])
    assert [x["dataset"] for x in doc["results"]] == ["one", "two"]  # the control is evaluated


def test_control_needs_the_grid(env, invoke, vecs):
    r = invoke(*base_args(env, "one"), vecs[0], "--control", env["dir"] / "two")
    assert r.exit_code == 1 and "--grid" in r.stderr
