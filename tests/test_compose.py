"""compose: the composition maths, gradients, objectives, layouts, selections, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compose_assets import extract, load_bank, model_args

from tvtool.compose.coefs import (
    Coefs,
    compose_params,
    learnable_mask,
)
from tvtool.models.functional import encode_images, visual_params
from tvtool.store.store import Store
from tvtool.vectors.blocks import partition_ids
from tvtool.vectors.stored import load_tensor_object

CPU = torch.device("cpu")


def _by_hand(clip, store, digests, layout, lam):
    """theta = theta_0 + sum_t Lambda * tau with plain indexing, key by key, as a state dict."""
    state = {k: v.clone() for k, v in clip.model.state_dict().items()}
    taus = [load_tensor_object(store, d, "vector")[1] for d in digests]
    for blk, off in zip(layout.blocks, layout.offsets(), strict=True):
        for key in blk.keys:
            for t, tau in enumerate(taus):
                if key not in tau:
                    continue
                if blk.groups == 1:
                    c = lam[t, off]
                else:
                    ids = partition_ids(
                        key, tuple(tau[key].shape), blk.groups, layout.partition_seed
                    )
                    c = lam[t, off + ids]
                state[key] = state[key] + c * tau[key].float()
    return state


@pytest.mark.parametrize(
    "granularity,partitions", [("tensor", 1), ("tensor", 3), ("layer", 1), ("task", 1)]
)
def test_composition_equals_plain_formula(assets, clip, granularity, partitions):
    store = Store()
    digests = [extract(assets, assets.ft_colors, "c"), extract(assets, assets.ft_stripes, "s")]
    plan, layout, stacks = load_bank(clip, store, digests, granularity, partitions)
    torch.manual_seed(0)
    lam = torch.randn(2, layout.n_groups)
    params = compose_params(lam, stacks, layout, visual_params(clip))
    state = _by_hand(clip, store, digests, layout, lam)
    assert set(params) == {k.param for k in plan.keys}
    for p, v in params.items():
        torch.testing.assert_close(v, state[p], rtol=1e-5, atol=1e-6)
    import open_clip

    other = open_clip.create_model("tvtool-tiny", pretrained=None)
    other.load_state_dict(state)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = F.normalize(other.encode_image(images), dim=-1)
        got = encode_images(clip, params, images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_half_precision_vectors_compose_close_to_fp32(assets, clip):
    store = Store()
    digests = [extract(assets, assets.ft_colors, "c")]
    _, layout, full = load_bank(clip, store, digests, partitions=2)
    _, _, half = load_bank(clip, store, digests, partitions=2, dtype=torch.float16)
    assert all(s.tensor.dtype == torch.float16 for s in half)
    assert sum(s.nbytes for s in half) * 2 == sum(s.nbytes for s in full)
    lam = torch.randn(1, layout.n_groups)
    a = compose_params(lam, full, layout, visual_params(clip))
    b = compose_params(lam, half, layout, visual_params(clip))
    for p in a:
        torch.testing.assert_close(b[p], a[p], rtol=0, atol=2e-3)


def test_gradients_reach_only_lambda_and_match_plain_autograd(assets, clip):
    store = Store()
    digests = [extract(assets, assets.ft_colors, "c"), extract(assets, assets.ft_stripes, "s")]
    plan, layout, stacks = load_bank(clip, store, digests, partitions=2)
    coefs = Coefs(learnable_mask(layout, stacks))
    with torch.no_grad():
        coefs.values.normal_(0, 0.3)
    images = torch.randn(3, 3, 16, 16)
    target = torch.randn(3, 32)
    loss = (
        encode_images(clip, compose_params(coefs(), stacks, layout, visual_params(clip)), images)
        * target
    ).sum()
    loss.backward()
    assert coefs.values.grad is not None and float(coefs.values.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())
    assert all(not s.tensor.requires_grad and s.tensor.grad is None for s in stacks)
    # reference: the same loss through the hand-built state dict, Lambda a plain leaf tensor
    lam = coefs.matrix().clone().requires_grad_(True)
    state = _by_hand(clip, store, digests, layout, lam)
    ref = (encode_images(clip, {p: state[p] for p in visual_params(clip)}, images) * target).sum()
    (g,) = torch.autograd.grad(ref, lam)
    torch.testing.assert_close(coefs.values.grad, g.flatten()[coefs.index], rtol=1e-4, atol=1e-6)


def _shapes_count(plan, partitions):
    return sum(partitions if len(k.shape) >= 2 else 1 for k in plan.keys)


def test_partitions_and_granularity_change_the_number_of_coefficients(assets, clip):
    store = Store()
    digests = [extract(assets, assets.ft_colors, "c"), extract(assets, assets.ft_stripes, "s")]
    counts = {}
    for g, k in [("tensor", 1), ("tensor", 4), ("layer", 1), ("task", 1)]:
        plan, layout, stacks = load_bank(clip, store, digests, g, k)
        counts[(g, k)] = Coefs(learnable_mask(layout, stacks)).n_learnable
    n_keys = len(plan.keys)
    assert counts[("tensor", 1)] == 2 * n_keys
    assert counts[("tensor", 4)] == 2 * _shapes_count(plan, 4) > counts[("tensor", 1)]
    plan, layout, _ = load_bank(clip, store, digests, "layer", 1)
    assert counts[("layer", 1)] == 2 * len(layout.blocks) < counts[("tensor", 1)]
    assert counts[("task", 1)] == 2


def test_selection_limits_learned_pairs_and_loaded_tensors(assets, clip, invoke):
    from tvtool.compose.select import SelectionDoc

    store = Store()
    digests = [extract(assets, assets.ft_colors, "c"), extract(assets, assets.ft_stripes, "s")]
    plan, layout, _ = load_bank(clip, store, digests)
    keep = [(0, 0), (0, 3), (1, 3), (1, 7)]
    doc = SelectionDoc(
        vectors=digests,
        blocks=layout.blocks,
        keep=keep,
        scores=[[0.0] * len(layout.blocks)] * 2,
        score="grad",
    )
    sel = store.put_json(doc.model_dump(mode="json"), kind="selection", inputs=digests).digest
    r = invoke(
        "compose",
        *model_args(assets),
        "--data",
        assets.colors,
        "--selection",
        sel,
        "--epochs",
        "1",
        "--shots",
        "2",
        "--min-steps",
        "0",
        "--partitions",
        "2",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    by_key = {k.key: k for k in plan.keys}
    expected = sum(2 if len(by_key[layout.blocks[b].keys[0]].shape) >= 2 else 1 for _, b in keep)
    assert rep["learnable"] == expected
    numel = {k.key: torch.Size(k.shape).numel() for k in plan.keys}
    assert rep["vector_bytes"] == 4 * sum(numel[layout.blocks[b].keys[0]] for _, b in keep)
    coefs = torch.tensor(rep["coefs"])
    assert int((coefs != 0).sum()) <= expected and rep["selection"] == sel


def test_resume_continues_bit_for_bit(assets, clip):
    from tvtool.compose.compose_run import compose
    from tvtool.compose.requests import ComposeRequest

    store = Store()
    d = extract(assets, assets.ft_colors, "c")
    opts = ComposeRequest(
        vectors=[d],
        data=[assets.colors],
        shots=4,
        min_steps=0,
        epochs=4,
        batch_size=4,
        grad_accum=2,
        partitions=2,
    )
    full = compose(opts, clip)

    class Stop(Exception):
        pass

    def stop(epoch: int) -> None:
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        compose(opts, clip, on_epoch=stop)
    runs = list((store.tmp_dir / "compose-runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoint.pt").is_file()
    resumed = compose(opts.model_copy(update={"resume": True}), clip)
    assert resumed.resumed_from == 2
    assert torch.equal(torch.tensor(resumed.coefs), torch.tensor(full.coefs))
    assert resumed.history == full.history
    assert not runs[0].exists()  # cleaned up once stored


def test_bad_inputs_fail_clearly(assets, clip, invoke, tmp_path):
    from PIL import Image

    extract(assets, assets.ft_colors, "c")
    args = ["compose", "c", *model_args(assets), "--epochs", "1"]
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir(parents=True)
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(one / "only" / "x.png")
    cases = [
        (["--data", empty], "no images"),
        (["--data", one], "at least 2 classes"),
        (["--data", assets.colors, "--shots", "50"], "larger than class"),
        (["--data", assets.colors, "--objective", "nope"], "unknown objective"),
        (
            ["--data", assets.colors, "--objective", "pseudo", "--threshold", "0.9999"],
            "--threshold",
        ),
        (["--data", assets.colors, "--granularity", "layer", "--partitions", "2"], "partitions"),
        (
            ["--data", assets.colors, "--val", assets.colors_val, "--val", assets.colors_val],
            "one --val",
        ),
    ]
    for extra, message in cases:
        r = invoke(*args, *extra)
        assert r.exit_code == 1, (extra, r.stderr)
        assert message in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr


def test_vectors_from_another_base_or_architecture_are_refused(assets, clip, invoke, tmp_path):
    from tvtool.vectors.stored import save_tensor_object

    extract(assets, assets.ft_colors, "foreign", base=assets.other_base)
    r = invoke("compose", "foreign", *model_args(assets), "--data", assets.colors, "--epochs", "1")
    assert r.exit_code == 1 and "another base" in r.stderr and "--allow-other-base" in r.stderr
    ok = invoke(
        "compose",
        "foreign",
        *model_args(assets),
        "--data",
        assets.colors,
        "--epochs",
        "1",
        "--shots",
        "1",
        "--min-steps",
        "0",
        "--allow-other-base",
        "-q",
    )
    assert ok.exit_code == 0, ok.stderr
    # a vector whose tensors do not fit (another architecture), no fingerprint recorded
    store = Store()
    state = {k: torch.zeros(3, 3) for k in visual_params(clip)}
    save_tensor_object(store, "vector", state, params={})
    digest = next(
        d
        for d in store.iter_digests()
        if store.manifest(d).kind == "vector" and store.manifest(d).params == {}
    )
    store.set_ref("wide", digest)
    r = invoke("compose", "wide", *model_args(assets), "--data", assets.colors, "--epochs", "1")
    assert r.exit_code == 1 and "shape" in r.stderr and "another base or architecture" in r.stderr
