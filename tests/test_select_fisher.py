"""select --score fisher: the per-batch squared coefficient gradients, against autograd."""

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
