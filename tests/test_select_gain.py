"""select --score gain: the best subset of each block's vectors under a quadratic (empirical
Fisher) model, against a plain-torch computation (per-sample and per-batch gradients of one
scalar per (vector, block), itertools over the subsets)."""

from __future__ import annotations

import json
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from tvtool.compose.objectives import get_objective
from tvtool.compose.select_gain import gain_moments, keep_gain
from tvtool.datasets import images as mdata
from tvtool.models.functional import encode_images, visual_params
from tvtool.vectors.blocks import make_blocks


@pytest.fixture
def three(assets, clip, two_vectors, tmp_path):
    """The bank of c, s and c3 = 3 x c (a rescaled copy of c: the same direction), planned over
    the base's image tower: (store, digests, plan, folder, head, idx)."""
    from compose_assets import extract
    from safetensors.torch import load_file

    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.datasets.images import ImageFolder
    from tvtool.models.bank import plan_bank
    from tvtool.models.heads import zeroshot_head
    from tvtool.store.store import Store

    base, ft = load_file(str(assets.base)), load_file(str(assets.ft_colors))
    path = tmp_path / "ft_c3.safetensors"
    save_safetensors(path, {k: (v + 3 * (ft[k] - v)).contiguous() for k, v in base.items()}, {})
    digests = [*two_vectors, extract(assets, path, "c3")]
    store = Store()
    plan = plan_bank(
        store, digests, visual_params(clip), set(clip.model.state_dict()), clip.base_fingerprint
    )
    folder = ImageFolder(assets.colors)
    head = zeroshot_head(clip, folder.classnames)
    return store, digests, plan, folder, head, list(range(len(folder)))


def _coef_grads(clip, plan, store, blocks, folder, head, idx, bs):
    """Plain torch: per batch of `bs` images, d mean-CE / d eps [T, B] at eps = 0, where
    theta_k = theta_0,k + eps[t, b] tau_t,k for the keys k of block b."""
    from tvtool.vectors.stored import load_tensor_object

    param_of = {k.key: k.param for k in plan.keys}
    taus = [load_tensor_object(store, v.digest, "vector")[1] for v in plan.vectors]
    base = visual_params(clip)
    tf = mdata.eval_transform(clip)
    out = []
    for s in range(0, len(idx), bs):
        eps = torch.zeros(len(taus), len(blocks), dtype=torch.float64, requires_grad=True)
        params = {p: w.detach().clone() for p, w in base.items()}
        for t, tau in enumerate(taus):
            for b, blk in enumerate(blocks):
                for k in blk.keys:
                    if k in tau and k in param_of:
                        p = param_of[k]
                        params[p] = params[p] + (eps[t, b] * tau[k].double()).float()
        images, labels = mdata.load_tensors(folder, idx[s : s + bs], tf)
        feats = encode_images(clip, params, images)
        F.cross_entropy(clip.logit_scale * feats @ head.T, labels).backward()
        out.append((eps.grad.T.clone(), len(labels)))  # [B, T]
    return out


def test_gain_moments_per_sample_are_the_empirical_fisher(three, clip):
    """Batches of one image: g is the mean per-sample gradient of the block's coefficients and
    F = (1/n) sum_i d_i d_i^T, exactly."""
    store, digests, plan, folder, head, idx = three
    blocks = make_blocks(plan.shapes(), "tensor")
    sets = [(folder, idx, folder.labels, head)]
    g, Fm = gain_moments(store, plan, blocks, clip, get_objective("ce"), sets, 1)
    d = torch.stack([x for x, _ in _coef_grads(clip, plan, store, blocks, folder, head, idx, 1)])
    ref_g = d.mean(0)
    ref_F = torch.einsum("nbt,nbu->btu", d, d) / len(idx)
    torch.testing.assert_close(g, ref_g, rtol=5e-3, atol=1e-9)
    torch.testing.assert_close(Fm, ref_F, rtol=5e-3, atol=1e-9)


def test_gain_moments_from_batches(three, clip):
    """Batches of 5 (the last one smaller): g = sum_j (m_j / n) d_j, F = g g^T + the per-sample
    covariance estimated from the batch means, sum_j m_j (d_j - g)(d_j - g)^T / (J - 1)
    x (n - 1) / n."""
    store, digests, plan, folder, head, idx = three
    blocks = make_blocks(plan.shapes(), "tensor")
    sets = [(folder, idx, folder.labels, head)]
    g, Fm = gain_moments(store, plan, blocks, clip, get_objective("ce"), sets, 5)
    batches = _coef_grads(clip, plan, store, blocks, folder, head, idx, 5)
    n, J = len(idx), len(batches)
    ref_g = sum(d * m for d, m in batches) / n
    cov = sum(m * (d - ref_g).unsqueeze(-1) * (d - ref_g).unsqueeze(-2) for d, m in batches)
    ref_F = ref_g.unsqueeze(-1) * ref_g.unsqueeze(-2) + cov / (J - 1) * (n - 1) / n
    torch.testing.assert_close(g, ref_g, rtol=5e-3, atol=1e-9)
    torch.testing.assert_close(Fm, ref_F, rtol=5e-3, atol=1e-9)
    # two data sets: the losses add, so do g and F
    g2, F2 = gain_moments(store, plan, blocks, clip, get_objective("ce"), sets * 2, 5)
    torch.testing.assert_close(g2, 2 * g)
    torch.testing.assert_close(F2, 2 * Fm)


def _brute_force(g, Fm, top, ridge):
    """Per block, every subset of `top` vectors with a non-zero Fisher diagonal:
    g_S^T (F_SS + ridge diag(F_SS))^-1 g_S / 2 with an explicit inverse."""
    best = []
    for b in range(g.shape[0]):
        cand = [t for t in range(g.shape[1]) if Fm[b, t, t] > 0]
        gains = {}
        for sub in combinations(cand, min(top, len(cand))):
            i = list(sub)
            fs = Fm[b][i][:, i]
            fs = fs + ridge * torch.diag(torch.diagonal(fs))
            gains[sub] = 0.5 * float(g[b, i] @ torch.linalg.inv(fs) @ g[b, i])
        best.append(gains)
    return best


def test_keep_gain_is_the_best_subset_scale_free_and_not_redundant(three, clip):
    store, digests, plan, folder, head, idx = three
    blocks = make_blocks(plan.shapes(), "tensor")
    sets = [(folder, idx, folder.labels, head)]
    g, Fm = gain_moments(store, plan, blocks, clip, get_objective("ce"), sets, 4)
    covered = torch.ones(3, len(blocks), dtype=torch.bool)
    ridge = 1e-3
    scores, keep = keep_gain(g, Fm, covered, 2, ridge)
    ref = _brute_force(g, Fm, 2, ridge)
    kept = {b: sorted(t for t, bb in keep if bb == b) for b in range(len(blocks))}
    for b, gains in enumerate(ref):
        if not gains:
            assert kept.get(b, []) == []
            continue
        top = max(gains.values())
        assert gains[tuple(kept[b])] == pytest.approx(top, rel=1e-6)
        for t in range(3):  # the score: the best gain of a subset holding t
            held = [v for sub, v in gains.items() if t in sub]
            assert float(scores[t, b]) == pytest.approx(max(held, default=0.0), rel=1e-6)
        assert 0 <= top <= 0.5 + 1e-9
    c, s, c3 = 0, 1, 2
    moved = [b for b in range(len(blocks)) if Fm[b, c, c] > 0 and Fm[b, s, s] > 0]
    assert moved
    for b in moved:
        # scale-free: c alone and 3 x c alone predict the same decrease
        one = keep_gain(g[b : b + 1], Fm[b : b + 1], covered[:, b : b + 1], 1, ridge)[0]
        assert float(one[c, 0]) == pytest.approx(float(one[c3, 0]), rel=1e-6)
        # redundant: c with its own rescaled copy is never the best pair
        assert kept[b] != [c, c3]
    # greedy search (forced): with pairs it reaches the exhaustive optimum
    greedy_scores, greedy_keep = keep_gain(g, Fm, covered, 2, ridge, exhaustive=0)
    assert greedy_keep == keep
    torch.testing.assert_close(greedy_scores, scores)


def test_select_score_gain_cli(select_two):
    r = select_two("--score", "gain", "--top", "1", "--batch-size", "8", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["score"] == "gain" and len(doc["keep"]) == len(doc["blocks"])
    for t, b in doc["keep"]:  # the kept vector scores highest in its block
        assert doc["scores"][t][b] == max(row[b] for row in doc["scores"])
    r = select_two("--score", "gain", "--budget-mb", "0.01", "--batch-size", "8", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] <= 10_000
    r = select_two("--score", "gain", "--top", "1", "--batch-size", "1000")
    assert r.exit_code == 1 and "two batches" in r.stderr
