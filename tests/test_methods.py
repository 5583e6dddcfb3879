"""Merge-method maths against plain torch: top-k (per tensor and streamed global), DARE, TIES."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvtool.errors import TvtoolError
from tvtool.vectors import methods
from tvtool.vectors.methods import (
    METHODS,
    KthLargest,
    MergeParams,
    TermState,
    apply_steps,
    combine,
    dare,
    dare_seed,
    ties_combine,
    topk_count,
    topk_mask,
)
from tvtool.vectors.terms import Term, default_scale, parse_size, parse_term


def ref_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a stable sort by decreasing magnitude keeps the lower index among equals."""
    flat = a.reshape(-1)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(a.shape)


def test_topk_count_rounds_half_up_and_clamps():
    assert topk_count(10, 0.2) == 2
    assert topk_count(10, 0.25) == 3  # 2.5 -> 3
    assert topk_count(7, 0.0) == 0
    assert topk_count(7, 1.0) == 7
    assert topk_count(1000, 0.2) == 200


@pytest.mark.parametrize("histogram", [False, True])
@pytest.mark.parametrize("k", [0, 1, 5, 17, 40])
def test_topk_mask_exact_k_with_ties_lower_index_first(k, histogram, monkeypatch):
    if histogram:  # large tensors take the histogram path: force it on a small one
        monkeypatch.setattr(methods, "_KTHVALUE_MAX", 0)
    g = torch.Generator().manual_seed(k)
    a = torch.randint(0, 4, (5, 8), generator=g).float()  # many equal magnitudes
    got = topk_mask(a, k)
    assert int(got.sum()) == k
    assert torch.equal(got, ref_topk(a, k))


def test_topk_mask_tie_rule_by_example():
    a = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert topk_mask(a, 3).tolist() == [False, True, True, True, False, False]
    assert topk_mask(a, 4).tolist() == [False, True, True, True, True, False]


def _stream_topk(chunks: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    n = sum(c.numel() for c in chunks)
    kth = KthLargest(k, n)
    if kth.needs_passes:
        for c in chunks:
            kth.add_pass1(c)
        kth.end_pass1()
        for c in chunks:
            kth.add_pass2(c)
    rule = kth.result()
    return [rule.mask(c) for c in chunks]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    density=st.floats(0.0, 1.0),
    levels=st.sampled_from([3, 1000, 0]),
    seed=st.integers(0, 2**16),
)
def test_global_threshold_equals_sort_of_the_concatenation(sizes, density, levels, seed):
    g = torch.Generator().manual_seed(seed)
    if levels:  # few distinct values: ties across tensors
        chunks = [torch.randint(0, levels, (s,), generator=g).float() * 0.125 for s in sizes]
    else:  # continuous, spread over many binades
        chunks = [torch.randn(s, generator=g).abs() * 10.0 ** torch.randint(-8, 8, (1,)).item()
                  for s in sizes]
    n = sum(sizes)
    k = topk_count(n, density)
    got = torch.cat(_stream_topk(chunks, k))
    assert int(got.sum()) == k
    assert torch.equal(got, ref_topk(torch.cat(chunks), k))


def test_global_threshold_on_values_in_one_histogram_bucket():
    # values differing only in the low mantissa bits land in one pass-1 bucket
    base = torch.tensor(1.0).view(torch.int32)
    bits = base + torch.randperm(3000, generator=torch.Generator().manual_seed(0)).int()
    a = bits.view(torch.float32)
    chunks = list(a.split(700))
    got = torch.cat(_stream_topk(chunks, 1234))
    assert torch.equal(got, ref_topk(a, 1234))


def test_dare_is_deterministic_and_unbiased():
    tau = torch.randn(64, generator=torch.Generator().manual_seed(1))
    p = 0.7

    def d(seed: int, prob: float = p) -> torch.Tensor:
        return dare(tau.clone(), prob, seed)  # dare works in place

    assert torch.equal(d(5), d(5))
    assert not torch.equal(d(5), d(6))
    one = d(5)
    kept = one != 0
    assert torch.allclose(one[kept], tau[kept] / (1 - p))
    draws = torch.stack([d(s) for s in range(4000)])
    assert abs((draws == 0).float().mean().item() - p) < 0.01
    # E[dare(tau)] = tau: the standard error of the mean is |tau| * sqrt(p/(1-p)/n) ~ 0.024 |tau|
    err = (draws.mean(0) - tau).abs() / tau.abs()
    assert err.max().item() < 0.12
    assert torch.equal(d(3, 0.0), tau)


def test_dare_seed_depends_on_seed_vector_and_name():
    s = {dare_seed(0, "v1", "a"), dare_seed(1, "v1", "a"), dare_seed(0, "v2", "a"),
         dare_seed(0, "v1", "b")}
    assert len(s) == 4


def ref_ties(xs: list[torch.Tensor]) -> torch.Tensor:
    stack = torch.stack(xs)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (sign != 0)
    total = (stack * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def test_ties_combine_matches_reference():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(50, generator=g) * (torch.rand(50, generator=g) > 0.5) for _ in range(4)]
    assert torch.allclose(ties_combine(xs), ref_ties(xs), atol=1e-7)
    # an entry whose values cancel exactly stays 0
    assert ties_combine([torch.tensor([1.0]), torch.tensor([-1.0])]).item() == 0.0
    # disjoint mean by example: elected +, mean of the positive entries
    got = ties_combine([torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([-2.0])])
    assert got.item() == 2.0


def test_combine_sum_and_ties_scale():
    base = torch.ones(3)
    xs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -2.0, 0.0])]
    got = combine(base.clone(), [x.clone() for x in xs], [0.5, -1.0], "sum", 9.0)
    assert torch.allclose(got, base + 0.5 * xs[0] - xs[1])
    got = combine(base.clone(), [x.clone() for x in xs], [1.0, -2.0], "ties", 0.5)
    assert torch.allclose(got, base + 0.5 * ref_ties([xs[0], -2.0 * xs[1]]))


def test_steps_mask_and_tensor_trim():
    p = MergeParams(method="magnitude", scope="tensor", density=0.5)
    x = torch.tensor([1.0, -4.0, 3.0, -2.0])
    got = apply_steps(x.clone(), "k", TermState("v", 1.0), p.steps, p)
    assert got.tolist() == [0.0, -4.0, 3.0, 0.0]
    pm = MergeParams(method="mask")
    m = torch.tensor([1, 0, 1, 0], dtype=torch.uint8)
    got = apply_steps(x.clone(), "k", TermState("v", 1.0), pm.steps, pm, m)
    assert got.tolist() == [1, 0, 3, 0]
    assert apply_steps(x.clone(), "k", TermState("v", 1.0), pm.steps, pm, None).tolist() == [0] * 4


def test_registry_pipelines_and_recorded_params():
    assert set(METHODS) == {"sum", "ties", "dare", "magnitude", "mask"}
    assert MergeParams(method="dare", then="ties").steps == ("dare", "trim")
    assert MergeParams(method="dare", then="ties").combiner == "ties"
    assert MergeParams(method="dare").steps == ("dare",)
    assert MergeParams(method="sum").recorded() == {"scale": 1.0}
    assert set(MergeParams(method="ties").recorded()) == {"scale", "density", "scope"}
    for bad in (dict(density=1.5), dict(drop=1.0), dict(scope="x"), dict(then="dare"),
                dict(method="avg"), dict(scale=float("nan"))):
        with pytest.raises(TvtoolError):
            MergeParams(**bad).validate()


def test_parse_terms():
    assert parse_term("cars") == Term("cars", None, False)
    assert parse_term("cars:0.3") == Term("cars", 0.3, False)
    assert parse_term("-mnist:0.5").resolved_weight(9) == -0.5
    assert parse_term("-mnist").resolved_weight(0.3) == -0.3
    assert parse_term("ns/cars:-1e-1").resolved_weight(1) == pytest.approx(-0.1)
    assert parse_term("sha256:abcdef12").ref == "sha256:abcdef12"
    assert parse_term("sha256:abcdef12:2") == Term("sha256:abcdef12", 2.0, False)
    for bad in ("cars:x", "", "-", "cars:", "--x", "cars:inf"):
        with pytest.raises(TvtoolError):
            parse_term(bad)


def test_scale_rule_and_sizes():
    one, two = [Term("a")], [Term("a"), Term("b")]
    assert default_scale("sum", "sum", one) == 1.0
    assert default_scale("sum", "sum", two) == 0.3
    assert default_scale("magnitude", "sum", two) == 0.3
    assert default_scale("ties", "sum", two) == 1.0
    assert default_scale("dare", "ties", two) == 1.0
    assert default_scale("dare", "sum", two) == 0.3
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1500") == 1500
    assert parse_size("1.5kb") == 1500
    for bad in ("", "5XB", "0"):
        with pytest.raises(TvtoolError):
            parse_size(bad)
