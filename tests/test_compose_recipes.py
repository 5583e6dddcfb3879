"""compose's defaults per run kind (the authors' settings), oversampling, init/clamp, atlas's
partition rule and selection by normalised accuracy."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from compose_assets import extract, model_args

from tvtool.compose.recipes import RECIPES, recipe_for


def test_recipe_for_each_kind_of_run():
    assert recipe_for("ce", ["task"]).name == "few-shot"
    assert recipe_for("ce", ["task", "task"]).name == "addition"
    assert recipe_for("ce", ["target", "control"]).name == "negation"
    assert recipe_for("entropy", ["task", "task"]).name == "test-time-entropy"
    assert recipe_for("pseudo", ["task"]).name == "test-time-pseudo"
    fs, add = RECIPES["few-shot"], RECIPES["addition"]
    assert (fs.lr, fs.weight_decay, fs.clip_grad, fs.min_steps) == (0.1, 0.1, 1.0, 10)
    assert add.per_set_batch(8) == 16 and add.schedule == "constant" and add.epochs == 20
    assert RECIPES["test-time-entropy"].per_set_batch(8) == 32  # per set, as AdaMerging


@pytest.mark.parametrize(
    ("n", "per_step", "want"), [(12, 128, 107), (36, 4, 2), (40, 4, 1), (640, 64, 1)]
)
def test_oversampling_follows_atlas(n, per_step, want):
    """learn_few_shots.py: r = n / batch; r < 10 -> repeat int(10 / r) + 1 times."""
    from tvtool.compose.train import oversampling

    assert oversampling(n, per_step, 10) == want
    assert oversampling(n, per_step, 0) == 1
    reps = oversampling(n, per_step, 10)
    assert -(-n * reps // per_step) >= 10  # an epoch then has at least 10 steps


def test_few_shot_defaults_are_recorded_and_oversample(assets, clip, invoke):
    extract(assets, assets.ft_colors, "c")
    r = invoke(
        "compose", "c", *model_args(assets), "--data", assets.colors, "--shots", "2",
        "--batch-size", "4", "--epochs", "1", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    s = rep["settings"]
    assert rep["recipe"] == "few-shot"
    assert (s["lr"], s["weight_decay"], s["schedule"], s["clip_grad"], s["augment"]) == (
        0.1, 0.1, "cosine", 1.0, "atlas",
    )  # fmt: skip
    n = rep["data"][0]["train"]  # 2 shots x classes; 4 per step -> r = n/4 < 10
    assert s["oversampling"] == [int(10 / (n / 4)) + 1]
    assert rep["steps"] == -(-n * s["oversampling"][0] // 4)


@pytest.mark.slow
def test_init_and_clamp_adamerging_style(assets, clip, invoke):
    extract(assets, assets.ft_colors, "c")
    base = [*model_args(assets), "--data", assets.colors, "--objective", "entropy", "--epochs", "1"]
    still = json.loads(invoke("compose", "c", *base, "--lr", "0", "--init", "0.3", "--json").stdout)
    learnable = [c for row in still["coefs"] for c in row if c != 0]
    assert learnable and all(c == pytest.approx(0.3) for c in learnable)
    clamped = json.loads(
        invoke("compose", "c", *base, "--init", "0.3", "--clamp", "0:0.1", "--json").stdout
    )
    assert all(0 <= c <= 0.1 + 1e-6 for row in clamped["coefs"] for c in row)
    assert any(c > 0.05 for row in clamped["coefs"] for c in row)  # clamped from 0.3
    assert clamped["settings"]["clamp"] == [0.0, 0.1] and clamped["recipe"] == "test-time-entropy"
    bad = invoke("compose", "c", *base, "--clamp", "1:0")
    assert bad.exit_code == 1 and "--clamp" in bad.stderr


def test_atlas_partition_rule_composes_only_2d_weights(assets, clip):
    from tvtool.compose.coefs import (
        Coefs,
        attach_layout,
        build_layout,
        compose_params,
        learnable_mask,
    )
    from tvtool.models.bank import load_stacks, plan_bank
    from tvtool.models.functional import visual_params
    from tvtool.store.store import Store

    store = Store()
    d = extract(assets, assets.ft_colors, "c")
    tower = visual_params(clip)
    plan = plan_bank(store, [d], tower, set(clip.model.state_dict()), clip.base_fingerprint)
    atlas = build_layout(plan, "tensor", 3, 0, "atlas")
    ours = build_layout(plan, "tensor", 3, 0, "tvtool")
    shapes = plan.shapes()
    for b_atlas, b_ours in zip(atlas.blocks, ours.blocks, strict=True):
        dims = len(shapes[b_atlas.keys[0]])
        assert b_atlas.groups == (3 if dims == 2 else 1)
        assert b_ours.groups == (3 if dims >= 2 else 1)
    assert any(len(s) == 4 for s in shapes.values())  # conv1: partitioned by tvtool only
    stacks = load_stacks(store, plan, torch.device("cpu"), torch.float32)
    attach_layout(atlas, stacks)
    coefs = Coefs(learnable_mask(atlas, stacks), init=0.5)
    theta = compose_params(coefs(), stacks, atlas, tower)
    for k, v in theta.items():
        if len(v.shape) == 2:
            assert not torch.equal(v, tower[k]), k
        else:  # not composed at all, as atlas's mask_multiply returns 0 for them
            assert torch.equal(v, tower[k]), k


def test_addition_selects_by_normalised_accuracy():
    """Trainer.score: mean of acc / fine-tuned acc when fine-tuned accuracies are given."""
    from tvtool.compose.train import Trainer

    tasks = [SimpleNamespace(name="A", role="task"), SimpleNamespace(name="B", role="task")]
    e1, e2 = {"A": 0.40, "B": 0.95}, {"A": 0.50, "B": 0.80}
    plain = SimpleNamespace(select_by="val", tasks=tasks, s=SimpleNamespace(finetuned=None))
    norm = SimpleNamespace(
        select_by="val", tasks=tasks, s=SimpleNamespace(finetuned={"A": 0.5, "B": 1.0})
    )
    assert Trainer.score(plain, e1, e1) > Trainer.score(plain, e2, e1)  # mean: 0.675 > 0.65
    assert Trainer.score(norm, e2, e1) > Trainer.score(norm, e1, e1)  # normalised: 0.9 > 0.875
