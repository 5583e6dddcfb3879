"""Merge-method maths against plain torch expressions of each paper's formula (and mergekit's
rules where they differ), the registry, and the term grammar."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvtool.errors import TvtoolError
from tvtool.vectors.methods import METHODS, make_params, param_fields, topk
from tvtool.vectors.methods.base import TensorInfo, TermState
from tvtool.vectors.methods.ops import dare, dare_seed, elect_and_merge
from tvtool.vectors.methods.topk import BandKth, KthLargest, topk_count, topk_mask, trim_rows
from tvtool.vectors.terms import Term, default_scale, parse_size, parse_term


def merge_tensor(name: str, base, taus, weights, scale: float = 1.0, **params):
    """What the executor does for one whole tensor (per-tensor scopes, no pre-pass)."""
    method = METHODS[name]
    p = make_params(name, params)
    info = TensorInfo("k", tuple(base.shape))
    states = [TermState(vector=f"v{i}", weight=w) for i, w in enumerate(weights)]
    xs = [method.term(t.clone().reshape(-1), info, s, p)
          for t, s in zip(taus, states, strict=True)]
    out = method.combine(base.clone().reshape(-1), xs, list(weights), scale, p, info)
    return out.reshape(base.shape)


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def ref_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a stable sort by decreasing magnitude keeps the lower index among equals."""
    flat = a.reshape(-1)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(a.shape)


def test_topk_count_truncates_like_ties_peft_and_mergekit():
    for n, d in [(10, 0.2), (10, 0.25), (7, 0.0), (7, 1.0), (1000, 0.2), (3, 0.5), (100, 0.29)]:
        assert topk_count(n, d) == int(d * n)  # mergekit: int(density * numel)
    assert topk_count(10, 0.25) == 2  # not rounded: 2.5 -> 2
    assert topk_count(3, 0.1) == 0  # mergekit keeps max(1, ...): a documented difference


@pytest.mark.parametrize("histogram", [False, True])
@pytest.mark.parametrize("k", [0, 1, 5, 17, 40])
def test_topk_mask_exact_k_with_ties_lower_index_first(k, histogram, monkeypatch):
    if histogram:  # large tensors take the histogram path: force it on a small one
        monkeypatch.setattr(topk, "_KTHVALUE_MAX", 0)
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


@pytest.mark.parametrize("levels", [0, 50])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.97, 1.0])
def test_band_threshold_from_a_sample_equals_the_sort(levels, density):
    g = torch.Generator().manual_seed(int(density * 100) + levels)
    a = torch.randn(400_000, generator=g).abs()
    if levels:  # many ties at the threshold
        a = (a * levels).round() / levels
    n, k = a.numel(), topk_count(a.numel(), density)
    band = BandKth(k, n, a[7::13].contiguous())
    for c in a.split(40_000):
        band.add(c)
    rule = band.result()
    assert rule is not None
    got = torch.cat([rule.mask(c) for c in a.split(9999)])
    assert int(got.sum()) == k
    assert torch.equal(got, ref_topk(a, k))


@pytest.mark.parametrize("density", [0.01, 0.3, 0.97])
def test_band_threshold_knows_where_its_kept_ties_end(density):
    """With positions, the rule says where the ties it keeps stop (`cut`), so the tensors of a
    vector can be trimmed in any order, slice by slice, and still keep the first ties."""
    g = torch.Generator().manual_seed(int(density * 100))
    a = (torch.randn(300_000, generator=g).abs() * 20).round() / 20  # many ties at the threshold
    n, k = a.numel(), topk_count(a.numel(), density)
    band = BandKth(k, n, a[5::11].contiguous())
    for off in range(0, n, 30_000):
        band.add(a[off: off + 30_000], off)
    rule = band.result()
    assert rule is not None and rule.ordered
    offset, ties = band.tie_piece(rule)  # the piece holding the last tie kept, as merge does
    piece = a[offset: offset + 30_000]
    rule.cut = offset + topk.ties_cut(piece, topk.GlobalTopK(value=rule.value, ties=ties))
    assert int((a[: rule.cut] == rule.value).sum()) == rule.ties == ties + int(
        (a[:offset] == rule.value).sum())
    ref = a * ref_topk(a, k)
    edges = [0, 1000, 77_777, 150_001, 299_999, n]  # "tensors" of the vector, trimmed last first
    got = torch.empty_like(a)
    for lo_t, hi_t in reversed(list(zip(edges, edges[1:], strict=False))):
        tensor_rule, cut = rule.at(lo_t, hi_t - lo_t)
        for lo in range(lo_t, hi_t, 4099):
            hi = min(hi_t, lo + 4099)
            x = a[lo:hi].clone().reshape(1, -1)
            sliced = topk.slice_rule(tensor_rule, cut, lo - lo_t, hi - lo_t)
            topk.shrink_rows(x, [sliced], torch.empty_like(x))
            got[lo:hi] = x[0]
    assert torch.equal(got, ref)


def test_band_threshold_misled_by_its_sample_says_so():
    a = torch.rand(20_000, generator=torch.Generator().manual_seed(1))
    band = BandKth(1000, a.numel(), torch.rand(5000) * 0.01)  # a sample of another stream
    band.add(a)
    assert band.result() is None


def test_trim_rows_equals_trim_of_each_row():
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-3, 4, (4, 300), generator=g).float()) * 0.5
    rows = [r.clone() for r in x]
    ks = [0, 17, 150, 300]
    rules = [topk.topk_rule(r.abs(), k) for r, k in zip(rows, ks, strict=True)]
    ref = [r * ref_topk(r.abs(), k) for r, k in zip(rows, ks, strict=True)]
    for lo in range(0, 300, 64):  # in slices, as the merge does
        trim_rows(x[:, lo:lo + 64], rules)
    assert torch.equal(x, torch.stack(ref))


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


def test_dare_l1_rescale_matches_the_tensor_norm_and_none_keeps_values():
    tau = _rand((40,), 3)
    u = torch.rand(tau.shape, generator=torch.Generator().manual_seed(11))
    kept = tau * (u >= 0.6)
    got = dare(tau.clone(), 0.6, 11, "l1")
    assert torch.allclose(got, kept * tau.abs().sum() / kept.abs().sum(), atol=1e-6)
    assert torch.allclose(got.abs().sum(), tau.abs().sum(), rtol=1e-6)
    assert torch.equal(dare(tau.clone(), 0.6, 11, "none"), kept)


def test_dare_seed_depends_on_seed_vector_and_name():
    s = {dare_seed(0, "v1", "a"), dare_seed(1, "v1", "a"), dare_seed(0, "v2", "a"),
         dare_seed(0, "v1", "b")}
    assert len(s) == 4


def ref_ties(xs, weights, normalize=True):
    """mergekit's TIES: sign of the weighted sum (0 -> +1); agreeing entries summed, divided
    (normalize) by the agreeing terms' summed |weight|."""
    stack = torch.stack(xs)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stack) == sign
    total = (stack * agree).sum(0)
    if not normalize:
        return total
    w = torch.tensor(weights).abs().reshape(-1, *[1] * xs[0].dim())
    den = (w * agree).sum(0)
    return torch.where(den > 0, total / den.clamp(min=1e-30), 0.0)


def test_elect_and_merge_matches_mergekit_rules():
    g = torch.Generator().manual_seed(2)
    ws = [1.0, 0.5, 2.0, -1.0]
    xs = [w * torch.randn(50, generator=g) * (torch.rand(50, generator=g) > 0.5) for w in ws]
    got = elect_and_merge([x.clone() for x in xs], ws, True)
    assert torch.allclose(got, ref_ties(xs, ws), atol=1e-6)
    assert torch.allclose(elect_and_merge([x.clone() for x in xs], ws, False),
                          ref_ties(xs, ws, False), atol=1e-6)
    # the stated rules by example: a zero sum elects +, so the positive entries are kept
    assert elect_and_merge([torch.tensor([1.0]), torch.tensor([-1.0])], [1, 1], True).item() == 1
    # weights are relative inside the mean: (3*1 + 1*2) / (1 + 2) with w = (1, 2)
    got = elect_and_merge([torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([-2.0])],
                          [1.0, 2.0, 1.0], True)
    assert got.item() == pytest.approx(5.0 / 3.0)
    assert elect_and_merge([torch.zeros(2), torch.zeros(2)], [1, 1], True).tolist() == [0, 0]


def test_ties_and_magnitude_per_tensor_against_reference():
    base, taus = _rand((6, 5), 0), [_rand((6, 5), 10 + i) for i in range(3)]
    ws = [1.0, -0.5, 2.0]
    trimmed = [t * ref_topk(t.abs(), int(0.4 * t.numel())) for t in taus]
    got = merge_tensor("ties", base, taus, ws, scale=0.7, density=0.4, scope="tensor")
    ref = base + 0.7 * ref_ties([w * t for w, t in zip(ws, trimmed, strict=True)], ws)
    assert torch.allclose(got, ref, atol=1e-6)
    got = merge_tensor("magnitude", base, taus, ws, density=0.4, scope="tensor")
    ref = base + sum(w * t for w, t in zip(ws, trimmed, strict=True))
    assert torch.allclose(got, ref, atol=1e-6)


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    base, taus = _rand((10, 10), 1), [_rand((10, 10), 20 + i) for i in range(2)]
    ws = [0.3, 0.6]

    def ref(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
        n = t.numel()
        order = torch.sort(-t.abs().reshape(-1), stable=True).indices  # largest first
        k, g = int(density * n), int(gamma * n)
        g = min(g, n - k)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[g:g + k]] = True
        return t * keep.reshape(t.shape)

    got = merge_tensor("breadcrumbs", base, taus, ws, density=0.8, gamma=0.05)
    want = base + sum(w * ref(t, 0.8, 0.05) for w, t in zip(ws, taus, strict=True))
    assert torch.allclose(got, want,
                          atol=1e-6)
    one = merge_tensor("breadcrumbs", torch.zeros(10, 10), taus[:1], [1.0], density=0.8,
                       gamma=0.05)
    assert int((one != 0).sum()) == 80  # 5 largest and 15 smallest dropped
    assert one.abs().max() < taus[0].abs().max()
    # gamma + density > 1: fewer outliers dropped, density still honoured
    edge = merge_tensor("breadcrumbs", torch.zeros(10, 10), taus[:1], [1.0], density=0.9,
                        gamma=0.5)
    assert int((edge != 0).sum()) == 90 and torch.allclose(edge, ref(taus[0], 0.9, 0.5))


def test_della_magnitude_ranked_keep_probabilities_and_rescale():
    base, taus = _rand((4, 9), 2), [_rand((4, 9), 30 + i) for i in range(3)]
    ws, density, eps = [1.0, 0.5, 1.5], 0.5, 0.2

    def ref_drop(t: torch.Tensor, vector: str) -> torch.Tensor:
        rows, n = t.shape
        q = torch.empty_like(t)
        for r in range(rows):  # rank within the row, ascending |tau|, lower index first
            order = sorted(range(n), key=lambda j: (abs(float(t[r, j])), j))
            for rank, j in enumerate(order):
                q[r, j] = density - eps + 2 * eps * rank / (n - 1)
        g = torch.Generator().manual_seed(dare_seed(0, vector, "k"))
        u = torch.rand(t.shape, generator=g)
        return torch.where(u < q, t / q, 0.0)

    dropped = [ref_drop(t, f"v{i}") for i, t in enumerate(taus)]
    got = merge_tensor("della", base, taus, ws, scale=0.9, density=density, epsilon=eps)
    ref = base + 0.9 * ref_ties([w * d for w, d in zip(ws, dropped, strict=True)], ws)
    assert torch.allclose(got, ref, atol=1e-5)
    # unbiased: E[drop(tau)] = tau
    tau = taus[0][0]
    draws = torch.stack([METHODS["della"].term(
        tau.clone(), TensorInfo("k", (9,)), TermState(f"s{s}", 1.0),
        make_params("della", {"density": density, "epsilon": eps})) for s in range(3000)])
    assert ((draws.mean(0) - tau).abs() / tau.abs()).max() < 0.15
    with pytest.raises(TvtoolError, match="density - epsilon"):
        make_params("della", {"density": 0.2, "epsilon": 0.3})


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_against_the_papers_interpolation(filter_wise):
    base = _rand((5, 8), 3)
    common = _rand((5, 8), 40)
    fts = [base + common + 0.7 * _rand((5, 8), 41 + i) for i in range(3)]  # correlated fine-tunes
    taus = [f - base for f in fts]
    got = merge_tensor("model_stock", base, taus, [1.0] * 3, filter_wise=filter_wise)
    k = 3

    def ratio(vs: list[torch.Tensor]) -> torch.Tensor:
        cos = [torch.nn.functional.cosine_similarity(vs[i], vs[j], dim=0)
               for i in range(k) for j in range(i + 1, k)]
        c = torch.stack(cos).mean()
        return k * c / (1 + (k - 1) * c)

    w_avg = torch.stack(fts).mean(0)
    if filter_wise:
        t = torch.stack([ratio([tau[r] for tau in taus]) for r in range(5)]).unsqueeze(1)
    else:
        t = ratio([tau.reshape(-1) for tau in taus])
    ref = t * w_avg + (1 - t) * base  # Model Stock: w_H = t w_avg + (1 - t) w_0
    assert torch.allclose(got, ref, atol=1e-5)
    assert 0 < float(t.min()) < 1
    assert "at least 2" in METHODS["model_stock"].check(make_params("model_stock"), 1)


def test_slerp_against_the_formula_and_its_endpoints():
    base = _rand((7, 3), 4)
    taus = [_rand((7, 3), 50), _rand((7, 3), 51)]
    ws = [1.0, 0.5]
    v0, v1 = (base + ws[0] * taus[0]).double(), (base + ws[1] * taus[1]).double()
    for t in (0.0, 0.3, 1.0):
        got = merge_tensor("slerp", base, taus, ws, t=t)
        a, b = v0.reshape(-1), v1.reshape(-1)
        omega = torch.arccos(torch.dot(a / a.norm(), b / b.norm()))
        ref = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
        assert torch.allclose(got.double().reshape(-1), ref, atol=1e-5)
    assert torch.allclose(merge_tensor("slerp", base, taus, ws, t=0.0), v0.float(), atol=1e-6)
    # parallel tensors: linear interpolation
    par = merge_tensor("slerp", base, [base, 2 * base], [1.0, 1.0], t=0.25)
    assert torch.allclose(par, 0.75 * 2 * base + 0.25 * 3 * base, atol=1e-5)
    assert "exactly 2" in METHODS["slerp"].check(make_params("slerp"), 3)


def test_steps_mask_and_tensor_trim():
    info = TensorInfo("k", (4,))
    x = torch.tensor([1.0, -4.0, 3.0, -2.0])
    p = make_params("magnitude", {"scope": "tensor", "density": 0.5})
    got = METHODS["magnitude"].term(x.clone(), info, TermState("v", 1.0), p)
    assert got.tolist() == [0.0, -4.0, 3.0, 0.0]
    pm = make_params("mask")
    m = torch.tensor([1, 0, 1, 0], dtype=torch.uint8)
    got = METHODS["mask"].term(x.clone(), info, TermState("v", 1.0), pm, m)
    assert got.tolist() == [1, 0, 3, 0]
    assert METHODS["mask"].term(x.clone(), info, TermState("v", 1.0), pm, None).tolist() == [0] * 4


def test_registry_capabilities_and_params():
    assert {"sum", "ties", "dare", "magnitude", "mask", "breadcrumbs", "della", "model_stock",
            "slerp"} <= set(METHODS)
    dt = make_params("dare", {"then": "ties"})
    assert dt.density is None and METHODS["dare"].global_density(dt) is None  # no silent trim
    assert METHODS["dare"].global_density(make_params("dare", {"then": "ties", "density": 0.5}))
    assert not METHODS["dare"].weighted_sum(dt) and METHODS["dare"].whole_tensor(dt)
    assert METHODS["ties"].global_density(make_params("ties")) == 0.2
    assert not METHODS["ties"].whole_tensor(make_params("ties"))
    assert METHODS["ties"].whole_tensor(make_params("ties", {"scope": "tensor"}))
    assert METHODS["slerp"].exact_terms == 2 and METHODS["mask"].uses_masks
    for name, _m in METHODS.items():  # stored with model_dump, read back with model_validate
        p = make_params(name)
        assert type(p).model_validate(p.model_dump()) == p
    for name, bad in (("ties", dict(density=1.5)), ("dare", dict(drop=1.0)),
                      ("ties", dict(scope="x")), ("dare", dict(then="dare")),
                      ("ties", dict(drop=0.5)), ("dare", dict(density=0.5))):
        with pytest.raises(TvtoolError):
            make_params(name, bad)
    with pytest.raises(TvtoolError, match="unknown method"):
        make_params("avg")


def test_every_params_field_has_a_cli_flag():
    import typer

    from tvtool.cli.app import app
    from tvtool.vectors.methods import cli_flag

    cmd = typer.main.get_command(app).commands["merge"]
    flags = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
    for m in METHODS.values():
        for name, info in param_fields(m).items():
            assert cli_flag(name, info) in flags, f"{m.name}.{name} has no flag"


def test_parse_terms():
    assert parse_term("cars") == Term("cars", None, False)
    assert parse_term("cars:0.3") == Term("cars", 0.3, False)
    assert parse_term("-mnist:0.5").resolved_weight(9) == -0.5
    assert parse_term("-mnist").resolved_weight(0.3) == -0.3
    assert parse_term("ns/cars:-1e-1").resolved_weight(1) == pytest.approx(-0.1)
    assert parse_term("sha256:abcdef12").ref == "sha256:abcdef12"
    assert parse_term("sha256:abcdef12:2") == Term("sha256:abcdef12", 2.0, False)
    for bad in ("cars:x", "", "-", "cars:", "--x", "cars:inf", "cars:nan", "cars:1e308",
                "cars:-1e7"):
        with pytest.raises(TvtoolError):
            parse_term(bad)


def test_eval_uses_the_same_term_grammar():
    from tvtool.models.weights import parse_weighted

    assert parse_weighted("-v:0.5") == ("v", -0.5)
    assert parse_weighted("v") == ("v", 1.0)
    for bad in ("v:nan", "v:inf", "v:1e308"):
        with pytest.raises(TvtoolError):
            parse_weighted(bad)


def test_scale_rule_and_sizes():
    from tvtool.vectors.terms import check_scale

    assert default_scale(True, 1) == 1.0
    assert default_scale(True, 2) == 0.3
    assert default_scale(False, 2) == 1.0
    for m, p, want in (("magnitude", {}, 0.3), ("ties", {}, 1.0), ("dare", {"then": "ties"}, 1.0),
                       ("dare", {}, 0.3), ("slerp", {}, 1.0), ("della", {}, 1.0)):
        assert default_scale(METHODS[m].weighted_sum(make_params(m, p)), 2) == want
    for bad in (math.inf, math.nan, 1e308):
        with pytest.raises(TvtoolError):
            check_scale(bad)
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1500") == 1500
    assert parse_size("1.5kb") == 1500
    for bad in ("", "5XB", "0"):
        with pytest.raises(TvtoolError):
            parse_size(bad)


@pytest.mark.parametrize("levels", [0, 7, 300])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_partition_rule_and_ties_cut_equal_the_stable_sort(levels, density):
    g = torch.Generator().manual_seed(int(density * 100) + levels)
    x = torch.randn(150_000, generator=g)  # past _KTHVALUE_MAX: the partition path
    if levels:  # many equal magnitudes at the threshold
        x = (x * levels).round() / levels
    x[::11] = -0.0
    k = topk_count(x.numel(), density)
    a = x.abs()
    rule = topk.partition_rule(a.clone(), k)
    assert rule == topk.topk_rule(a, k)  # (which takes it for this size)
    want = ref_topk(a, k)
    if rule.ordered:  # some ties kept, the first ones: >= value before the cut, > after
        cut = topk.ties_cut(x, rule)
        keep = torch.cat([a[:cut] >= rule.value, a[cut:] > rule.value])
    else:
        keep = a >= rule.bound()
    assert torch.equal(keep, want)
    assert levels == 0 or rule.ordered or density == 0.97


def test_shrink_rows_with_slice_rules_is_trim_rows_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    x = (torch.randint(-3, 4, (4, 1000), generator=g).float()) * 0.5
    x[:, ::7] = -0.0
    x[2, 5] = float("inf")
    ks = [0, 170, 500, 1000]
    rules = [topk.topk_rule(r.abs(), k) for r, k in zip(x, ks, strict=True)]
    cuts = [topk.ties_cut(r, ru) if ru.ordered else None for r, ru in zip(x, rules, strict=True)]
    assert any(c is not None for c in cuts)
    ref = x.clone()
    trim_rows(ref, [topk.topk_rule(r.abs(), k) for r, k in zip(x, ks, strict=True)])
    got = x.clone()
    for lo in range(0, 1000, 96):  # in slices, as whole_rows does
        hi = min(1000, lo + 96)
        sliced = [topk.slice_rule(ru, c, lo, hi) for ru, c in zip(rules, cuts, strict=True)]
        topk.shrink_rows(got[:, lo:hi], sliced, torch.empty(4, hi - lo))
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # zero signs too
