"""select: gradient scores against autograd through Lambda, top-N / budget keeping, masks, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compose_assets import extract, model_args

from tvtool.compose.coefs import Coefs, build_layout, compose_params, learnable_mask
from tvtool.compose.objectives import get_objective
from tvtool.compose.select import base_gradient, grad_scores, keep_budget, keep_top, norm_scores
from tvtool.datasets import images as mdata
from tvtool.models.bank import load_stacks
from tvtool.models.functional import encode_images, visual_params
from tvtool.store.store import Store
from tvtool.vectors.blocks import make_blocks
from tvtool.vectors.stored import load_tensor_object


@pytest.mark.parametrize("granularity", ["tensor", "layer"])
def test_grad_scores_match_autograd_through_lambda(bank, clip, granularity):
    store, digests, plan, folder, head, idx = bank
    grads = base_gradient(
        clip, plan, get_objective("ce"), [(folder, idx, folder.labels, head)], batch_size=10
    )
    blocks = make_blocks(plan.shapes(), granularity)
    scores = grad_scores(store, plan, blocks, grads)
    # reference: d mean-CE / d Lambda at Lambda = 0, one full batch, through the composition
    layout = build_layout(plan, granularity)
    stacks = load_stacks(store, plan, torch.device("cpu"), torch.float32)
    coefs = Coefs(learnable_mask(layout, stacks))
    images, labels = mdata.load_tensors(folder, idx, mdata.eval_transform(clip))
    feats = encode_images(
        clip, compose_params(coefs(), stacks, layout, visual_params(clip)), images
    )
    F.cross_entropy(clip.logit_scale * feats @ head.T, labels).backward()
    ref = coefs.values.grad.view(len(digests), layout.n_groups).abs().double()
    assert [b.name for b in blocks] == [b.name for b in layout.blocks]
    torch.testing.assert_close(scores, ref, rtol=2e-3, atol=1e-7)
    assert float(scores.max()) > 0


def test_keep_top_and_budget():
    scores = torch.tensor([[3.0, 1.0, 5.0], [2.0, 4.0, 0.5], [1.0, 9.0, 0.1]], dtype=torch.float64)
    covered = torch.ones(3, 3, dtype=torch.bool)
    covered[2, 1] = False  # vector 2 does not touch block 1
    assert keep_top(scores, covered, 1) == [(0, 0), (1, 1), (0, 2)]
    assert keep_top(scores, covered, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    nbytes = torch.tensor([[10, 10, 30], [10, 10, 30], [10, 10, 30]])
    # greedy by score: (0,2)=5 [30], (1,1)=4 [10], (0,0)=3 [10] -> 50 bytes; (1,0)=2 no longer fits
    assert keep_budget(scores, covered, nbytes, 50) == [(0, 0), (1, 1), (0, 2)]
    assert keep_budget(scores, covered, nbytes, 45) == [(1, 1), (0, 2)]
    assert keep_budget(scores, covered, nbytes, 25) == [
        (0, 0),
        (1, 1),
    ]  # the 30-byte best is skipped
    from tvtool.errors import TvtoolError

    with pytest.raises(TvtoolError, match="too small"):
        keep_budget(scores, covered, nbytes, 5)


@pytest.mark.slow
def test_select_grad_cli_feeds_compose(assets, clip, invoke, select_two):
    r = select_two(
        "--shots",
        "3",
        "--top",
        "1",
        "--name",
        "sel",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    n_blocks = len(rep["blocks"])
    assert len(rep["keep"]) == n_blocks  # one vector per block
    for t, b in rep["keep"]:
        assert rep["scores"][t][b] >= rep["scores"][1 - t][b]
    store = Store()
    m = store.manifest(store.resolve("sel"))
    assert m.kind == "selection" and m.inputs == [v["digest"] for v in rep["vectors"]]
    doc = store.read_json(m.digest)
    assert set(doc) >= {"vectors", "blocks", "keep", "scores"}
    c = invoke(
        "compose",
        *model_args(assets),
        "--data",
        assets.colors,
        "--selection",
        "sel",
        "--shots",
        "2",
        "--epochs",
        "1",
        "--json",
    )
    assert c.exit_code == 0, c.stderr
    crep = json.loads(c.stdout)
    assert crep["learnable"] == n_blocks and crep["groups"] == n_blocks
    # budget: the kept bytes fit; the human view names layers and vectors
    b = select_two(
        "--shots",
        "3",
        "--budget-mb",
        "0.1",
    )
    assert b.exit_code == 0, b.stderr
    assert "resblocks.0" in b.stderr and "c" in b.stderr and len(b.stdout.strip()) == 64
    brep = store.read_json(b.stdout.strip())
    assert store.manifest(b.stdout.strip()).params["bytes"] <= 100_000 and brep["keep"]


def test_importance_masks_match_reference(clip, bank, select_two):
    store, digests, plan, folder, head, idx = bank
    r = select_two(
        "--score",
        "importance",
        "--density",
        "0.1",
        "--batch-size",
        "7",
        "--name",
        "imp",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [m["name"] for m in rep["masks"]] == ["imp/c", "imp/s"]
    # reference gradient: plain autograd on the base weights, one batch
    params = {k: v.detach().clone().requires_grad_(True) for k, v in visual_params(clip).items()}
    images, labels = mdata.load_tensors(folder, idx, mdata.eval_transform(clip))
    loss = F.cross_entropy(clip.logit_scale * encode_images(clip, params, images) @ head.T, labels)
    g = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    for d, m in zip(digests, rep["masks"], strict=True):
        _, tau = load_tensor_object(store, d, "vector")
        imp = torch.cat([(tau[k] * g[k]).abs().flatten() for k in tau])
        k = round(0.1 * imp.numel())
        assert m["kept"] == k and m["scored"] == imp.numel()
        man, mask = load_tensor_object(store, m["digest"], "mask")
        assert man.params["vector"] == d and man.params["density"] == 0.1 and man.inputs == [d]
        assert set(mask) == set(tau) and all(mask[k].dtype == torch.bool for k in mask)
        got = torch.cat([mask[key].flatten() for key in tau])
        expected = torch.zeros_like(got)
        expected[torch.topk(imp, k).indices] = True
        assert int((got != expected).sum()) <= 2  # float ties at the threshold at most


def test_norm_is_data_free(assets, invoke):
    extract(assets, assets.ft_colors, "c")
    extract(assets, assets.ft_stripes, "s")
    store = Store()
    r = invoke("select", "c", "s", "--score", "norm", "--density", "0.3", "-q")
    assert r.exit_code == 0, r.stderr
    digests = r.stdout.split()
    assert len(digests) == 2
    _, tau = load_tensor_object(store, "c", "vector")
    _, mask = load_tensor_object(store, digests[0], "mask")
    mags = torch.cat([tau[k].abs().flatten() for k in tau])
    kept = torch.cat([mask[k].flatten() for k in tau])
    assert int(kept.sum()) == round(0.3 * mags.numel())
    assert float(mags[kept].min()) >= float(mags[~kept].max())
    s = invoke(
        "select", "c", "s", "--score", "norm", "--top", "1", "--granularity", "layer", "--json"
    )
    assert s.exit_code == 0, s.stderr
    rep = json.loads(s.stdout)
    from tvtool.models.bank import plan_from_vectors

    plan = plan_from_vectors(store, ["c", "s"])
    ref = norm_scores(store, plan, make_blocks(plan.shapes(), "layer"))
    torch.testing.assert_close(torch.tensor(rep["scores"], dtype=torch.float64), ref)
    for t, name in enumerate(["c", "s"]):  # against plain torch norms, block by block
        _, tau = load_tensor_object(store, name, "vector")
        for b, blk in enumerate(make_blocks(plan.shapes(), "layer")):
            sq = sum(float(tau[k].double().square().sum()) for k in blk.keys if k in tau)
            assert float(ref[t, b]) == pytest.approx(sq**0.5, rel=1e-6)
    assert all(rep["scores"][t][b] == max(row[b] for row in rep["scores"]) for t, b in rep["keep"])


def test_select_option_errors(assets, invoke):
    extract(assets, assets.ft_colors, "c")
    cases = [
        (["c", *model_args(assets), "--data", assets.colors], "--top N or --budget-mb"),
        (["c", "--score", "importance"], "needs the model"),
        (["c", "--score", "norm", "--density", "0"], "--density"),
        (["c", "--score", "norm", "--top", "1", "--budget-mb", "3"], "not both"),
        (["c", "--score", "magic", "--top", "1"], "unknown --score"),
        (["c", "--score", "importance", "--top", "2"], "do not apply"),
    ]
    for args, message in cases:
        r = invoke("select", *args)
        assert r.exit_code == 1, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
