"""compose.mixing: the fused products against a plain torch expression (values and gradients),
for every dtype and code path (CPU chunked upcasts, the batched device path), partitioned too."""

from __future__ import annotations

import pytest
import torch

from tvtool.compose import mixing
from tvtool.models.bank import Stack

L, N_VEC, SHAPE = 3, 4, (5, 7)


def _case(dtype: torch.dtype, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.randn(L, N_VEC, *SHAPE, generator=g).to(dtype)
    base = torch.randn(L, *SHAPE, generator=g, dtype=wide)
    lam = torch.randn(L, N_VEC, groups, generator=g, dtype=wide)
    ids = torch.randint(0, groups, (L, *SHAPE), generator=g).to(torch.uint8)
    stack = Stack(
        ["a", "b", "c"], ["a", "b", "c"], SHAPE, list(range(N_VEC)), tau.clone(),
        groups=groups, ids=ids if groups > 1 else None,
    )
    return tau, base, lam, ids, stack


def _plain(tau, base, lam, ids):
    """base[p] + sum_j lam[p, j, ids[p, i]] * tau[p, j, i], element by element."""
    coef = torch.stack(
        [torch.stack([lam[p, j][ids[p].long()] for j in range(N_VEC)]) for p in range(L)]
    )  # [L, n, *shape]
    return base + (coef * tau.to(base.dtype)).sum(1)


def _check(dtype, groups, tol):
    tau, base, lam, ids, stack = _case(dtype, groups)
    lam_a = lam.clone().requires_grad_(True)
    lam_b = lam.clone().requires_grad_(True)
    out = mixing.compose_stack(lam_a, stack, base)
    ref = _plain(tau, base, lam_b, ids)
    torch.testing.assert_close(out, ref, **tol)
    up = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(out, lam_a, up)
    (gb,) = torch.autograd.grad(ref, lam_b, up)
    torch.testing.assert_close(ga, gb, **tol)
    return stack


EXACT = {"rtol": 1e-5, "atol": 1e-6}
HALF = {"rtol": 2e-2, "atol": 2e-2}


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_precision_equals_plain_formula(dtype, groups):
    stack = _check(dtype, groups, EXACT)
    if groups > 1:  # laid out by group once: [L*K, n, M], every element somewhere
        assert stack.segments is not None and stack.tensor.shape[:2] == (L * groups, N_VEC)
        assert stack.segments.pos.unique().numel() == L * 35


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["cpu-chunked", "cpu-half-mv", "device-batched"])
def test_half_precision_paths_close_to_plain_formula(monkeypatch, dtype, groups, path):
    monkeypatch.setattr(mixing, "CHUNK", 8)  # several upcast slices per row
    if path == "cpu-chunked":  # backward by fp32 upcasts too (bf16, or few vectors)
        monkeypatch.setattr(mixing, "HALF_MV", N_VEC + 1)
    elif path == "cpu-half-mv":  # fp16: backward by torch's fp16 matrix-vector product
        monkeypatch.setattr(mixing, "HALF_MV", 1)
    else:  # the CUDA code path, run on CPU tensors
        monkeypatch.setattr(mixing, "_cpu", lambda st: False)
    _check(dtype, groups, HALF)


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_half_backward_is_accurate_and_survives_tiny_and_huge_gradients(monkeypatch, fused):
    """The CPU fp16 backward (torch's fp16 product on a power-of-two-scaled gradient, or fp32
    upcasts) against float64 for ordinary, tiny and huge gradients (both far outside fp16's
    range)."""
    monkeypatch.setattr(mixing, "HALF_MV", 1 if fused else N_VEC + 1)
    tau, base, lam, ids, stack = _case(torch.float16, 1)
    lam.requires_grad_(True)
    out = mixing.compose_stack(lam, stack, base)
    t64 = tau.double().reshape(L, N_VEC, -1)
    gen = torch.Generator().manual_seed(2)
    for size in (1.0, 1e-12, 1e30):
        up = size * torch.randn(out.shape, generator=gen)
        (g,) = torch.autograd.grad(out, lam, up, retain_graph=True)
        expected = torch.einsum("lnm,lm->ln", t64, up.double().reshape(L, -1))
        assert torch.isfinite(g).all()
        # fp16 products: an error of about 1e-3 of the largest sum (fp16 rounding of the scaled
        # gradient and of each row's result)
        top = float(expected.abs().max())
        torch.testing.assert_close(g[..., 0].double(), expected, rtol=2e-3, atol=3e-3 * top)
        assert g.abs().min() > 0


def test_half_mv_matches_float64_on_a_long_row():
    """One long row (many fp16 products accumulated): fp32 accumulation, relative error ~1e-3."""
    gen = torch.Generator().manual_seed(1)
    st = (1e-3 * torch.randn(5, 200_000, generator=gen)).half()
    g = 1e-7 * torch.randn(200_000, generator=gen)
    out = torch.empty(5)
    mixing._half_mv(st, g, out)
    ref = st.double() @ g.double()
    assert (out.double() - ref).abs().max() <= 2e-3 * ref.abs().max()
    big = torch.full((3, 1000), 60000.0).half()  # every fp16 product sum overflows
    mixing._half_mv(big, torch.ones(1000), out[:3])
    torch.testing.assert_close(out[:3], torch.full((3,), 6e7))  # recomputed in fp32


@pytest.mark.parametrize("groups", [1, 3])
def test_gradcheck(groups):
    _, base, lam, _, stack = _case(torch.float64, groups)
    lam.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mixing.compose_stack(x, stack, base), (lam,))


def test_tiny_gradients_survive_half_precision_vectors(monkeypatch):
    """The device path casts dL/dtheta to the vectors' dtype: rescaled first, so gradients far
    below fp16's smallest number still reach Lambda."""
    monkeypatch.setattr(mixing, "_cpu", lambda st: False)
    tau, base, lam, ids, stack = _case(torch.float16, 1)
    lam.requires_grad_(True)
    out = mixing.compose_stack(lam, stack, base)
    up = 1e-12 * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad(out, lam, up)
    expected = torch.einsum("lnm,lm->ln", tau.float().reshape(L, N_VEC, -1), up.reshape(L, -1))
    top = float(expected.abs().max())  # fp16 products: errors relative to the largest sum
    torch.testing.assert_close(g[..., 0], expected, rtol=2e-2, atol=1e-2 * top)
    assert g.abs().min() > 0


def test_vectors_and_base_get_no_gradient():
    tau, base, lam, ids, stack = _case(torch.float32, 3)
    base.requires_grad_(False)
    lam.requires_grad_(True)
    mixing.compose_stack(lam, stack, base).sum().backward()
    assert lam.grad is not None
    assert stack.tensor.grad is None and not stack.tensor.requires_grad and base.grad is None


def test_parts_into_reused_buffers_match_plain_autograd():
    """compose_parts with a reused output buffer and backward scratch: values and gradients
    equal torch autograd on the plain expression (float64 gradcheck), transposed gradients
    (as linear layers produce) included; the buffer is really reused, and backpropagating a
    graph whose theta was overwritten by the next composition raises instead of lying."""
    tau, base, lam, ids, stack = _case(torch.float64, 1)
    out, scratch = torch.empty_like(base), base.new_empty(base[0].numel())
    lam.requires_grad_(True)

    def f(x, buf=None):  # each part used transposed, so its gradient arrives non-contiguous
        parts = mixing.compose_parts(x, stack, base, buf, scratch)
        return torch.stack([p.t() @ p.t().T for p in parts])

    def ref(x):
        theta = base + (x[..., None] * tau).sum(1)
        return torch.stack([p.t() @ p.t().T for p in theta.unbind(0)])

    assert torch.autograd.gradcheck(f, (lam,))
    up = torch.randn(L, SHAPE[1], SHAPE[1], dtype=torch.float64)
    (gb,) = torch.autograd.grad(ref(lam), lam, up)
    y = f(lam, out)
    torch.testing.assert_close(y, ref(lam))
    (ga,) = torch.autograd.grad(y, lam, up)
    torch.testing.assert_close(ga, gb)
    parts = mixing.compose_parts(lam, stack, base, out, scratch)
    assert parts[0].data_ptr() == out.data_ptr()
    old = torch.stack([p.t() @ p.t().T for p in parts])
    mixing.compose_parts(lam, stack, base, out, scratch)
    with pytest.raises(RuntimeError):
        old.sum().backward()


@pytest.mark.parametrize("chunk", [1, 5, 8, 12, 35 * N_VEC, 10**6])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_chunks_of_any_size_match_plain_autograd(monkeypatch, dtype, chunk):
    """The CPU half-precision forward upcasts [n, CHUNK // n] slices into one reused fp32
    buffer and adds the base in the same product: slices that do not divide a row (35
    elements), of one column (CHUNK < n), or wider than the row; into a reused theta buffer
    and into fresh memory; the fp16 fp32-fallback backward (overflow) included."""
    monkeypatch.setattr(mixing, "CHUNK", chunk)
    monkeypatch.setattr(mixing, "HALF_MV", N_VEC + 1)  # backward by the chunked upcasts too
    tau, base, lam, ids, stack = _case(dtype, 1)
    lam_a, lam_b = lam[..., 0].clone().requires_grad_(True), lam.clone().requires_grad_(True)
    out = torch.full_like(base, float("nan"))  # stale contents must not leak into theta
    parts = mixing.compose_parts(lam_a[..., None], stack, base, out, base.new_empty(35))
    ref = _plain(tau, base, lam_b, ids)
    torch.testing.assert_close(torch.stack(parts), ref, **EXACT)
    up = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(parts, lam_a, list(up.unbind(0)))
    (gb,) = torch.autograd.grad(ref, lam_b, up)
    torch.testing.assert_close(ga, gb[..., 0], **EXACT)
    fresh = mixing._w_times_stack(lam[..., 0].unsqueeze(1), tau.reshape(L, N_VEC, -1), None)
    torch.testing.assert_close(fresh.view(ref.shape), ref - base, **EXACT)
    if dtype == torch.float16:  # every fp16 product overflows: recomputed by upcasts, exactly
        monkeypatch.setattr(mixing, "HALF_MV", 1)
        big = torch.full_like(tau, 60000.0)
        stack = Stack(["a", "b", "c"], ["a", "b", "c"], SHAPE, list(range(N_VEC)), big.clone())
        pos = up.abs()  # sums of 35 products of 60000 and up to 1: beyond fp16's 65504
        (ga,) = torch.autograd.grad(
            mixing.compose_parts(lam_a[..., None], stack, base), lam_a, list(pos.unbind(0))
        )
        expected = torch.einsum(
            "lnm,lm->ln", big.double().reshape(L, N_VEC, -1), pos.double().reshape(L, -1)
        )
        torch.testing.assert_close(ga.double(), expected, rtol=1e-5, atol=1e-2)
