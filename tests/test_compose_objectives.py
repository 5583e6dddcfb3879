"""compose end to end through the CLI: accuracy recovered, unsupervised objectives, negation,
task addition."""

from __future__ import annotations

import json

import pytest
import torch
from compose_assets import accuracy, extract, load_bank, model_args

from tvtool.compose.coefs import compose_params
from tvtool.models.functional import visual_params
from tvtool.store.store import Store
from tvtool.vectors.stored import load_tensor_object


@pytest.mark.slow
def test_compose_recovers_accuracy_on_its_task(assets, clip, invoke):
    extract(assets, assets.ft_colors, "vec/colors")
    extract(assets, assets.ft_stripes, "vec/stripes")
    base_acc = accuracy(clip, assets.colors_val)
    r = invoke(
        "compose",
        "vec/colors",
        "vec/stripes",
        *model_args(assets),
        "--data",
        assets.colors,
        "--val",
        assets.colors_val,
        "--shots",
        "4",
        "--min-steps",
        "0",
        "--epochs",
        "4",
        "--partitions",
        "2",
        "--name",
        "learned",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["history"][0]["val_acc"]["colors"] == pytest.approx(base_acc)
    assert rep["val_acc"]["colors"] >= base_acc + 0.4
    store = Store()
    assert store.resolve("learned") == rep["digest"]
    m = store.manifest(rep["digest"])
    assert m.kind == "coefs" and m.inputs == [v["digest"] for v in rep["vectors"]]
    assert m.params["base_fingerprint"] == clip.base_fingerprint and m.params["objective"] == "ce"
    assert m.params["shots"] == 4 and len(m.params["history"]) == 5
    assert m.params["layout"]["vectors"] == m.inputs and m.tensors[0].shape == [2, rep["groups"]]
    # apply the stored coefficients independently and measure
    _, t = load_tensor_object(store, rep["digest"], "coefs")
    _, layout, stacks = load_bank(clip, store, m.inputs, partitions=2, seed=0)
    assert layout.model_dump() == m.params["layout"]
    with torch.no_grad():
        override = compose_params(t["coefs"], stacks, layout, visual_params(clip))
    assert accuracy(clip, assets.colors_val, override) == pytest.approx(rep["val_acc"]["colors"])
    # the consumer side (eval/merge) reads the same layout: the same weights
    from tvtool.models.weights import apply_delta, coefs_delta

    delta, _ = coefs_delta(clip, store, rep["digest"])
    applied = apply_delta(clip, delta)
    for p, v in override.items():
        torch.testing.assert_close(applied[p], v, rtol=1e-5, atol=1e-6)
    q = invoke(
        "compose",
        "vec/colors",
        *model_args(assets),
        "--data",
        assets.colors,
        "--shots",
        "2",
        "--epochs",
        "1",
        "-q",
    )
    assert q.exit_code == 0 and len(q.stdout.strip()) == 64 and "loss" not in q.stderr


@pytest.mark.parametrize(
    "objective",
    [
        pytest.param("entropy", marks=pytest.mark.slow),
        "pseudo",
        pytest.param("ufm", marks=pytest.mark.slow),
    ],
)
def test_unsupervised_objectives_reduce_their_loss(assets, clip, invoke, objective, tmp_path):
    extract(assets, assets.ft_colors, "c")
    extract(assets, assets.ft_stripes, "s")
    # unlabelled images: loose files + a class-names file
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in sorted(assets.colors.rglob("*.png"))[::2]:
        (loose / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    names = tmp_path / "classes.txt"
    names.write_text("red\ngreen\nblue\n")
    r = invoke(
        "compose",
        "c",
        "s",
        *model_args(assets),
        "--data",
        loose,
        "--classnames",
        names,
        "--objective",
        objective,
        "--threshold",
        "0.0",
        "--epochs",
        "4",
        "--batch-size",
        "6",
        "--lr",
        "0.05",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    losses = [h["train_loss"] for h in rep["history"][1:]]
    assert losses[-1] < losses[0]
    assert rep["select_by"] == "last" and rep["epoch"] == 4
    if objective == "pseudo":
        assert rep["data"][0]["pseudo_kept"] == 18
    if objective == "ufm":  # every image trains; k = min(18 / 3 / 10, 100) = 0 trusted per class
        assert rep["data"][0]["train"] == 18 and rep["data"][0]["trusted"] == 0
        assert rep["recipe"] == "test-time-pseudo"


def test_ufm_trusted_set_and_loss_match_hand_computation():
    from tvtool.compose.objectives import trusted_labels, ufm_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 2, generator=g) * 3
    labels = trusted_labels(logits)  # k = min(40 / 2 / 10, 100) = 2 per class
    p = logits.softmax(-1)
    want = set(p[:, 0].argsort(descending=True)[:2].tolist()) | set(
        p[:, 1].argsort(descending=True)[:2].tolist()
    )
    assert {i for i, t in enumerate(labels) if t >= 0} == want
    assert all(labels[i] == int(p[i].argmax()) for i in want)
    strong, weak = torch.randn(40, 2, generator=g), logits
    trusted = torch.tensor(labels)
    got = ufm_loss(strong, weak, trusted, threshold=0.9)
    for i in range(40):  # soft CE against the weak softmax (or the one-hot trusted label)
        t = torch.nn.functional.one_hot(trusted[i], 2).float() if trusted[i] >= 0 else p[i]
        keep = trusted[i] >= 0 or float(t.max()) > 0.9
        ref = -(t * strong[i].log_softmax(-1)).sum() if keep else torch.tensor(0.0)
        assert float(got[i]) == pytest.approx(float(ref), abs=1e-6)


@pytest.mark.slow
def test_negation_forgets_the_target_and_keeps_the_control(assets, clip, invoke):
    # the model to edit is the colour-fine-tuned one: it knows the target task
    extract(assets, assets.ft_colors, "c")
    model = [
        "--model-config",
        assets.cfg,
        "--base",
        assets.ft_colors,
        "--device",
        "cpu",
        "--allow-other-base",
    ]
    r = invoke(
        "compose",
        "c",
        *model,
        "--negate",
        assets.colors,
        "--control",
        assets.stripes,
        "--shots",
        "4",
        "--epochs",
        "10",
        "--granularity",
        "task",
        "--lr",
        "0.2",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["select_by"] == "negation"
    base, chosen = rep["base_val_acc"], rep["val_acc"]
    assert base["colors (target)"] == 1.0
    assert chosen["colors (target)"] <= base["colors (target)"] - 0.3
    assert chosen["stripes (control)"] >= 0.95 * base["stripes (control)"]
    for h in rep["history"][1:]:  # a chosen epoch never breaks the constraint; others may
        if h["epoch"] == rep["epoch"]:
            assert h["val_acc"] == chosen
    assert float(torch.tensor(rep["coefs"]).mean()) < 0  # the vector is subtracted
    bad = invoke("compose", "c", *model, "--negate", assets.colors)
    assert bad.exit_code == 1 and "--control" in bad.stderr


@pytest.mark.slow
def test_task_addition_sums_losses_over_data_sets(assets, clip, invoke, two_vectors):
    r = invoke(
        "compose",
        "c",
        "s",
        *model_args(assets),
        "--data",
        assets.colors,
        "--data",
        assets.stripes,
        "--val-split",
        "0.25",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    h = rep["history"]
    assert set(h[0]["val_acc"]) == {"colors", "stripes"}
    assert h[1]["train_loss"] == pytest.approx(sum(h[1]["task_losses"].values()))
    assert [d["name"] for d in rep["data"]] == ["colors", "stripes"]
    assert rep["data"][0]["val"] == 3 * 3 and rep["data"][0]["train"] == 3 * 9
