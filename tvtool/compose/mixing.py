"""The composed weights and their gradient, one fused product per stack.

    theta_l = theta_0,l + sum_j Lambda[row_j, g_l(i)] * tau_j,l       (l: a parameter of the stack)
    dL/dLambda[row_j, g] = sum_{i: g_l(i) = g} tau_j,l[i] * dL/dtheta_l[i]

A stack holds L parameters of one shape covered by the same n vectors. Unpartitioned, the
forward is one `baddbmm` ([L, 1, n] @ [L, n, numel] + theta_0) and the backward one `bmm`
([L, n, numel] @ [L, numel, 1]): each step reads the vectors twice (the least it can, they are
needed for theta and for dL/dLambda) and writes theta once, with no per-vector loop and no
temporary the size of a vector.

Partitioned (K groups per parameter), the stack is laid out once, at the first composition, by
group: `tensor` becomes [L*K, n, M], row l*K + g holding the elements of parameter l in group g
(M: the largest group, shorter groups padded with zeros) and `pos` maps every element back. The
products are then the same two batched products over L*K rows, plus one gather of theta's
elements (forward) and one scatter of its gradient (backward).

Half-precision stacks on CUDA multiply in their dtype (half the memory traffic) and add to the
fp32 base; the gradient is rescaled before its cast to half so that small gradients do not
underflow. On the CPU torch's fp16 matrix-vector product (fp32 accumulation) is its fastest half
product (about as many elements a second as fp32 from memory on AVX2 without native half
arithmetic: half the byte rate; the others are slower still): the backward of an fp16 stack of
`HALF_MV` or more vectors is that product on the gradient rescaled by a power of two (exact) and
cast to fp16, one row pass per parameter (a non-finite result, an fp16 overflow, is recomputed
in fp32); the forward, and bf16 or narrow stacks, upcast `CHUNK`-element slices of the stack
([n, CHUNK // n]) into one reused fp32 scratch buffer that stays in the last-level cache (no
fresh pages per step, no trip of the fp32 copy through main memory) and multiply from there, the
forward adding the base in the same product (theta_slice = base_slice + w @ slice: no separate
pass over theta). Per step each vector is read twice (theta, then dL/dLambda), the least
possible: on the CPU the step is memory-bandwidth bound once the vectors outweigh the model's
arithmetic (bench/compose.py).
Base weights and vectors never receive gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvtool.models.bank import Stack

CHUNK = 3 << 18  # elements of a half-precision CPU stack upcast to fp32 at a time (3 MB: L3)
HALF = (torch.float16, torch.bfloat16)
HALF_MV = 4  # fp16 CPU stacks of this many vectors or more: backward by fp16 products
_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Reused memory for CPU upcasts (grown as needed, kept for the process): a fresh buffer
    per product would fault in new pages every step."""
    buf = _SCRATCH.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _upcast(st: torch.Tensor, a: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    """st[:, a : a + step] ([n, <= step]) copied into the scratch buffer in `dtype`."""
    part = st[:, a : a + step]
    return _scratch(part.numel(), dtype, st.device).view(part.shape).copy_(part)


def _pow2_scale(g: torch.Tensor) -> torch.Tensor:
    """A power of two s with max |g * s| in [0.5, 1) (1 for an all-zero g): scaling by it is
    exact, and the scaled gradient neither overflows nor (mostly) underflows fp16."""
    top = g.abs().amax()
    _, e = torch.frexp(torch.where(top > 0, top, torch.ones_like(top)))
    return torch.ldexp(torch.ones_like(top), -e)


def _half_mv(st: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """out [n] (g's dtype) = st [n, M] (fp16, CPU) @ g [M]: torch's fp16 product with fp32
    accumulation on the power-of-two-scaled gradient; recomputed in fp32 if it overflows."""
    s = _pow2_scale(g)
    gs = torch.mul(g, s, out=_scratch(g.numel(), st.dtype, st.device))  # one pass, reused memory
    r = torch.mv(st, gs)
    if bool(torch.isfinite(r).all()):
        torch.div(r.to(g.dtype), s, out=out)
        return
    out.zero_()
    _upcast_mv(st, g, out)


def _upcast_mv(st: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """out [n] += st [n, M] @ g [M] with st upcast to g's dtype slice by slice."""
    n, M = st.shape
    step = max(1, CHUNK // max(1, n))
    for a in range(0, M, step):
        out.addmv_(_upcast(st, a, step, g.dtype), g[a : a + step])


@dataclass
class Segments:
    """A partitioned stack laid out by group (see the module docstring)."""

    groups: int  # K
    width: int  # M, the largest group
    pos: torch.Tensor  # [L * numel] int32: element (l, i) -> its slot in the [L*K, 1, M] product


def _cpu(st: torch.Tensor) -> bool:
    """The CPU code paths (chunked upcasts, one matrix-vector product per batch row)?"""
    return st.device.type == "cpu"


def _w_times_stack(
    w: torch.Tensor, st: torch.Tensor, base: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """base + w @ st for w [B, 1, n], st [B, n, M], base [B, 1, M] or None; in w's dtype,
    written into `out` [B, 1, M] when given (a reused buffer: no fresh pages to fault in)."""
    if st.dtype == w.dtype:
        if out is None:
            return torch.bmm(w, st) if base is None else torch.baddbmm(base, w, st)
        return torch.bmm(w, st, out=out) if base is None else torch.baddbmm(base, w, st, out=out)
    if not _cpu(st):  # CUDA half: the product in half, the sum in fp32
        d = torch.bmm(w.to(st.dtype), st)
        r = d.to(w.dtype) if base is None else base + d
        return r if out is None else out.copy_(r)
    B, n, M = st.shape
    if out is None:
        out = torch.empty(B, 1, M, dtype=w.dtype, device=st.device)
    step = max(1, CHUNK // max(1, n))
    buf = _scratch(n * min(step, M), w.dtype, st.device)
    for b in range(B):
        s, o, wb = st[b], out[b], w[b]
        for a in range(0, M, step):
            e = min(a + step, M)
            u = buf[: n * (e - a)].view(n, e - a).copy_(s[:, a:e])  # cache-resident fp32
            if base is None:
                torch.mm(wb, u, out=o[:, a:e])
            else:  # base added in the same product: no separate pass over theta
                torch.addmm(base[b, :, a:e], wb, u, out=o[:, a:e])
    return out


def _stack_times_grad(st: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """st @ g for st [B, n, M], g [B, M, 1]; in g's dtype. (On the CPU one matrix-vector
    product per row of the batch: MKL's batched [n, M] @ [M, 1] is several times slower.)"""
    if not _cpu(st):
        if st.dtype == g.dtype:
            return torch.bmm(g.transpose(1, 2), st.transpose(1, 2)).transpose(1, 2)
        scale = g.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        gs = (g / scale).to(st.dtype)
        return torch.bmm(gs.transpose(1, 2), st.transpose(1, 2)).transpose(1, 2).to(g.dtype) * scale
    B, n, M = st.shape
    out = torch.zeros(B, n, 1, dtype=g.dtype, device=st.device)
    for b in range(B):
        _mv(st[b], g[b, :, 0], out[b, :, 0])
    return out


def _mv(st: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """out [n] = st [n, M] @ g [M] on the CPU, in g's dtype, whatever st's dtype."""
    if st.dtype == g.dtype:
        torch.mv(st, g, out=out)
    elif st.dtype == torch.float16 and st.shape[0] >= HALF_MV:
        _half_mv(st, g, out)
    else:
        out.zero_()
        _upcast_mv(st, g, out)


def _rows_times_grads(
    st: torch.Tensor, grads: tuple, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """[L, n]: row l = st[l] @ vec(grads[l]) (0 where a gradient is None), st [L, n, M]. On the
    CPU one matrix-vector product per parameter straight from its gradient (no stacked copy of
    the gradients; a transposed gradient, as linear layers produce, is first copied into
    `scratch` [M] when given, memory reused rather than fresh pages); on a device the batched
    product over the stacked gradients."""
    L, n, M = st.shape
    like = next(g for g in grads if g is not None)
    if not _cpu(st):
        g = torch.stack([like.new_zeros(like.shape) if g is None else g for g in grads])
        return _stack_times_grad(st, g.reshape(L, M, 1)).view(L, n)
    out = torch.zeros(L, n, dtype=like.dtype, device=st.device)
    for b, g in enumerate(grads):
        if g is None:
            continue
        if scratch is not None and not g.is_contiguous() and scratch.dtype == g.dtype:
            g = scratch.view(g.shape).copy_(g)
        _mv(st[b], g.reshape(-1), out[b])
    return out


class _Compose(torch.autograd.Function):
    """theta_l = base[l] + sum_j w[l, j] * stack[l, j] for l < L, returned as L tensors (the
    model's parameters; one output per parameter spares the backward a stacked copy of their
    gradients); gradients to w only. `out` [L, *shape]: a buffer to write theta into;
    `scratch` [numel]: one parameter's worth of memory for the backward."""

    @staticmethod
    def forward(ctx, w, stack, base, out, scratch):
        L, n = stack.shape[:2]
        theta = _w_times_stack(
            w.to(base.dtype).unsqueeze(1),
            stack.view(L, n, -1),
            base.reshape(L, 1, -1),
            None if out is None else out.view(L, 1, -1),
        )
        ctx.save_for_backward(stack)
        ctx.w_dtype, ctx.scratch = w.dtype, scratch
        ctx.set_materialize_grads(False)
        return tuple(theta.view(base.shape).unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        (stack,) = ctx.saved_tensors
        if all(g is None for g in grads):
            return None, None, None, None, None
        L, n = stack.shape[:2]
        gw = _rows_times_grads(stack.view(L, n, -1), grads, ctx.scratch)
        return gw.to(ctx.w_dtype), None, None, None, None


class _ComposeSegments(torch.autograd.Function):
    """The same for a stack laid out by group: lam [L, n, K], stack [L*K, n, M]."""

    @staticmethod
    def forward(ctx, lam, stack, pos, base):
        L, n, K = lam.shape
        w = lam.to(base.dtype).permute(0, 2, 1).reshape(L * K, 1, n)
        d = _w_times_stack(w, stack, None)  # [L*K, 1, M]
        theta = base + d.view(-1).index_select(0, pos).view(base.shape)
        ctx.save_for_backward(stack, pos)
        ctx.lam_shape, ctx.lam_dtype = (L, n, K), lam.dtype
        return theta

    @staticmethod
    def backward(ctx, grad):
        stack, pos = ctx.saved_tensors
        L, n, K = ctx.lam_shape
        gp = grad.new_zeros(stack.shape[0] * stack.shape[2])
        gp[pos] = grad.reshape(-1)
        gw = _stack_times_grad(stack, gp.view(stack.shape[0], -1, 1))  # [L*K, n, 1]
        return gw.view(L, K, n).permute(0, 2, 1).to(ctx.lam_dtype), None, None, None


@torch.no_grad()
def segment(stack: Stack) -> Segments:
    """Lay a partitioned stack out by group, in place (one parameter's worth of temporaries)."""
    if stack.segments is not None:
        return stack.segments
    assert stack.ids is not None
    t, ids = stack.tensor, stack.ids
    L, n, K = t.shape[0], t.shape[1], stack.groups
    N = ids[0].numel()
    counts = [torch.bincount(ids[p].reshape(-1).long(), minlength=K) for p in range(L)]
    M = int(torch.stack(counts).max())
    if L * K * M >= 2**31:
        raise ValueError("stack too large for 32-bit element positions")
    out = torch.zeros(L * K, n, M, dtype=t.dtype, device=t.device)
    pos = torch.empty(L, N, dtype=torch.int32, device=t.device)
    for p in range(L):
        idp = ids[p].reshape(-1).long()
        order = torch.argsort(idp, stable=True)
        starts = counts[p].cumsum(0) - counts[p]
        rank = torch.empty_like(idp)
        rank[order] = torch.arange(N, device=t.device) - starts[idp[order]]
        slot = idp * M + rank  # within this parameter's K*M slots
        tmp = torch.zeros(n, K * M, dtype=t.dtype, device=t.device)
        tmp[:, slot] = t[p].reshape(n, N)
        out[p * K : (p + 1) * K] = tmp.view(n, K, M).permute(1, 0, 2)
        pos[p] = slot + p * K * M
        del tmp
    stack.segments = Segments(K, M, pos.reshape(-1))
    stack.tensor = out
    return stack.segments


def compose_parts(
    lam: torch.Tensor,
    stack: Stack,
    base: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The stack's L composed parameters, base[l] + sum_j lam[l, j] * tau_j (see
    `compose_stack`). Unpartitioned dense stacks only: `out` [L, *shape] in base's dtype, a
    buffer theta is written into (the caller must not read it again once it composes the next
    step), and `scratch` [numel] memory for the backward."""
    if stack.factors is None and stack.ids is None:
        if out is not None and (out.shape != base.shape or out.dtype != base.dtype):
            out = None
        if scratch is not None and scratch.numel() != base[0].numel():
            scratch = None
        return list(_Compose.apply(lam[..., 0], stack.tensor, base, out, scratch))
    return list(compose_stack(lam, stack, base).unbind(0))


def compose_stack(lam: torch.Tensor, stack: Stack, base: torch.Tensor) -> torch.Tensor:
    """[L, *shape]: base + sum_j lam[l, j] * tau_j for each of the stack's parameters; `lam`
    is [L, n, groups] (the stack's coefficients), `base` [L, *shape]."""
    if stack.factors is not None:  # low-rank vectors: one product of rank n * r, nothing dense
        return base + stack.factors.mix(lam[..., 0], stack.shape).to(base.dtype)
    if stack.ids is None:
        return torch.stack(compose_parts(lam, stack, base))
    seg = segment(stack)
    return _ComposeSegments.apply(lam, stack.tensor, seg.pos, base)
