"""Per-tensor operations shared by several methods: DARE's random drop, TIES' sign election.

Seeds: every random stream is `torch.rand` of the tensor's shape from a generator seeded with
`dare_seed(seed, vector, key)`, so a tensor's draws depend only on the run's seed, the term's
identity (vector digest or checkpoint fingerprint) and the tensor name: the same inputs give the
same bytes whatever else is merged.
"""

from __future__ import annotations

import zlib

import torch


def dare_seed(seed: int, vector: str, key: str) -> int:
    """Generator seed for one (vector, tensor): the run's seed, the vector digest and the name."""
    return (seed * 1_000_003 + zlib.crc32(f"{vector}/{key}".encode())) % (2**63)


def uniform(x: torch.Tensor, seed: int) -> torch.Tensor:
    """u ~ U[0, 1) of x's shape, float32, from a generator seeded with `seed`."""
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def dare(x: torch.Tensor, p: float, seed: int, rescale: str = "inverse") -> torch.Tensor:
    """Drop each entry with probability p (in place): entry i survives when u_i >= p. Survivors
    are rescaled by 1/(1-p) (`inverse`, the DARE paper), by ||x||_1 / ||kept||_1 (`l1`:
    mergekit's per-tensor norm matching) or not at all (`none`)."""
    if p <= 0.0:
        return x
    keep = uniform(x, seed).sub_(p).sign_().add_(1).clamp_(max=1)  # 1.0 where u >= p
    if rescale == "inverse":
        return x.div_(1.0 - p).mul_(keep.to(x.dtype))
    before = float(x.abs().sum(dtype=torch.float64)) if rescale == "l1" else 0.0
    x.mul_(keep.to(x.dtype))
    if rescale == "l1":
        after = float(x.abs().sum(dtype=torch.float64))
        if after > 0.0:
            x.mul_(before / after)
    return x


def elect_and_merge(xs: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES' elect + disjoint merge of weighted tensors x_t = w_t * tau_t (already trimmed):
    `merge_rows` of their stack."""
    absw = [abs(w) for w in weights]
    return merge_rows(torch.stack([x.reshape(-1) for x in xs]), absw, normalize).reshape(
        xs[0].shape
    )


def merge_rows(
    x: torch.Tensor, absw: list[float], normalize: bool, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """TIES' elect + disjoint merge of the rows of x ([T, c], x_t = w_t * trimmed tau_t; x is
    overwritten), `absw` the |w_t|, `scratch` an optional float tensor of x's shape.

    Elected sign s = sign(sum_t x_t), a zero sum counting as +1 (mergekit's rule). An entry of
    x_t agrees when sign(x_t) == s (zeros never agree). Result: sum_t x_t [agree] divided, with
    `normalize`, by sum_t |w_t| [agree] (the disjoint mean; with unit weights the count of
    agreeing terms), else not divided (the disjoint sum). Entries where no term agrees are 0.
    Computed on the stack with few passes: p_t = s x_t agrees iff p_t > 0, and
    sum_t x_t [agree] = s * sum_t max(p_t, 0) (exact: the signs are +-1).
    """
    s = x.sum(0).sign_().add_(0.5).sign_()
    x.mul_(s)
    agree = None
    if normalize:
        agree = scratch if scratch is not None and scratch.dtype == x.dtype else None
        agree = torch.gt(x, 0, out=agree) if agree is not None else (x > 0).to(x.dtype)
    total = x.clamp_(min=0).sum(0).mul_(s)
    if agree is None:
        return total
    if any(w != 1.0 for w in absw):
        agree.mul_(torch.tensor(absw, dtype=x.dtype).reshape(-1, 1))
    denom = agree.sum(0)
    tiny = torch.finfo(x.dtype).smallest_normal
    if all(w == 0.0 or w >= tiny for w in absw):
        # 0 / 0 -> 0 in one pass: where no term agrees the total is a zero (of either sign),
        # and that zero over `tiny` is the same zero; every other denominator is >= tiny
        return total.div_(denom.clamp_(min=tiny))
    return total.div_(denom.add_(denom.eq(0).to(denom.dtype)))  # 0 / 0 -> 0
