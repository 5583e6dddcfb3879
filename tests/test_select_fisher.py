"""select --score fisher / fisher-unit: per-batch squared coefficient gradients (and per unit
norm of tau), against autograd."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from tvtool.compose.coefs import Coefs, build_layout, compose_params, learnable_mask
from tvtool.compose.objectives import get_objective
from tvtool.compose.select import base_gradient, fisher_scores, grad_scores
from tvtool.datasets import images as mdata
from tvtool.models.bank import load_stacks
from tvtool.models.functional import encode_images, visual_params
from tvtool.vectors.blocks import make_blocks


def test_fisher_scores_are_summed_squared_batch_gradients_of_lambda(bank, clip):
    store, digests, plan, folder, head, idx = bank
    sets = [(folder, idx, folder.labels, head)]
    blocks = make_blocks(plan.shapes(), "tensor")
    bs = 5
    scores = fisher_scores(store, plan, blocks, clip, get_objective("ce"), sets, bs)
    # reference: d mean-CE(batch j) / d Lambda at Lambda = 0 through the composition, squared
    layout = build_layout(plan, "tensor")
    stacks = load_stacks(store, plan, torch.device("cpu"), torch.float32)
    ref = torch.zeros(len(digests), layout.n_groups, dtype=torch.float64)
    tf = mdata.eval_transform(clip)
    for s in range(0, len(idx), bs):
        coefs = Coefs(learnable_mask(layout, stacks))
        images, labels = mdata.load_tensors(folder, idx[s : s + bs], tf)
        params = compose_params(coefs(), stacks, layout, visual_params(clip))
        feats = encode_images(clip, params, images)
        F.cross_entropy(clip.logit_scale * feats @ head.T, labels).backward()
        ref += coefs.values.grad.view(len(digests), layout.n_groups).double().pow(2)
    torch.testing.assert_close(scores, ref, rtol=5e-3, atol=1e-10)
    # the mean gradient's square never exceeds the mean squared batch gradient (Jensen), and with
    # batches that disagree it is strictly smaller: fisher keeps what grad cancels
    n_batches = -(-len(idx) // bs)
    grad = grad_scores(
        store, plan, blocks, base_gradient(clip, plan, get_objective("ce"), sets, bs)
    )
    assert bool((grad.pow(2) <= scores / n_batches * (1 + 1e-3) + 1e-12).all())
    assert bool((grad.pow(2) < scores / n_batches).any())


def test_select_score_fisher_cli(select_two):
    r = select_two(
        "--score",
        "fisher",
        "--top",
        "1",
        "--batch-size",
        "8",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["score"] == "fisher" and len(doc["keep"]) == len(doc["blocks"])


def test_fisher_unit_is_squared_directional_derivative_along_unit_tau(bank, clip):
    """fisher-unit against plain torch: one scalar eps[t, b] per (vector, block) moves the base
    along the unit vector tau_t,b / ||tau_t,b||; the score is sum over batches of
    (d mean-CE / d eps)^2 at eps = 0. Scale-free: doubling a vector leaves it unchanged."""
    from tvtool.compose.select import fisher_unit_scores, norm_scores
    from tvtool.vectors.stored import load_tensor_object

    store, digests, plan, folder, head, idx = bank
    sets = [(folder, idx, folder.labels, head)]
    blocks = make_blocks(plan.shapes(), "tensor")
    bs = 6
    fisher = fisher_scores(store, plan, blocks, clip, get_objective("ce"), sets, bs)
    norms = norm_scores(store, plan, blocks)
    scores = fisher_unit_scores(fisher, norms)
    # reference: plain torch, no tvtool composition code
    param_of = {k.key: k.param for k in plan.keys}
    taus = [load_tensor_object(store, d, "vector")[1] for d in digests]
    base = visual_params(clip)
    tf = mdata.eval_transform(clip)
    ref = torch.zeros(len(digests), len(blocks), dtype=torch.float64)
    for s in range(0, len(idx), bs):
        eps = torch.zeros(len(digests), len(blocks), dtype=torch.float64, requires_grad=True)
        params = {p: w.detach().clone() for p, w in base.items()}
        for t, tau in enumerate(taus):
            for b, blk in enumerate(blocks):
                keys = [k for k in blk.keys if k in tau and k in param_of]
                n = torch.sqrt(sum(tau[k].double().pow(2).sum() for k in keys))
                for k in keys:
                    p = param_of[k]
                    params[p] = params[p] + (eps[t, b] * tau[k].double() / n).float()
        images, labels = mdata.load_tensors(folder, idx[s : s + bs], tf)
        feats = encode_images(clip, params, images)
        F.cross_entropy(clip.logit_scale * feats @ head.T, labels).backward()
        ref += eps.grad.pow(2)
    torch.testing.assert_close(scores, ref, rtol=5e-3, atol=1e-10)
    assert torch.equal(scores, fisher / norms.pow(2))
    # scale-free: a vector's size does not change its score, while fisher grows with its square
    doubled = fisher_unit_scores(fisher * 4, norms * 2)
    torch.testing.assert_close(doubled, scores)
    # a zero part scores 0 (no direction), not NaN
    zero = fisher_unit_scores(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2))
    assert torch.equal(zero, torch.zeros(1, 2, dtype=torch.float64))


def test_select_score_fisher_unit_cli(select_two):
    r = select_two("--score", "fisher-unit", "--top", "1", "--batch-size", "8", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["score"] == "fisher-unit" and len(doc["keep"]) == len(doc["blocks"])
