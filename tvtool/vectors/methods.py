"""The merge-method registry: per-tensor maths, plus the one global pre-pass (top-k thresholds).

A method is a pipeline: each term's tensor goes through *steps* (`dare`, `mask`, `trim`), scaled
by the term's weight, then a *combiner* (`sum` or `ties`) turns the T tensors of one key into a
delta: `theta = base + scale * delta` (for `sum` the scale is folded into bare terms' weights).

Top-k rule (`trim`, used by `magnitude` and `ties`): keep exactly k = round(density * N) entries
with the largest |tau| (N: entries of the whole vector for scope `global`, of the tensor for scope
`tensor`). Among entries of equal magnitude at the threshold, earlier ones win: tensors in key
order (sorted names), then row-major index. The global threshold is found exactly with bounded
memory by `KthLargest` (two streamed passes of histograms over the float32 bit patterns).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tvtool.errors import TvtoolError

Steps = tuple[str, ...]


@dataclass(frozen=True)
class MergeParams:
    method: str = "sum"
    scale: float = 1.0
    density: float = 0.2
    scope: str = "global"
    drop: float = 0.9
    then: str = "sum"
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TvtoolError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if not 0.0 <= self.density <= 1.0:
            raise TvtoolError(f"--density must be in [0, 1], got {self.density}")
        if not 0.0 <= self.drop < 1.0:
            raise TvtoolError(f"--drop must be in [0, 1), got {self.drop}")
        if self.scope not in ("global", "tensor"):
            raise TvtoolError(f"--ties-scope must be global or tensor, got {self.scope!r}")
        if self.then not in ("sum", "ties"):
            raise TvtoolError(f"--then must be sum or ties, got {self.then!r}")
        if not math.isfinite(self.scale):
            raise TvtoolError("--scale must be a finite number")

    @property
    def steps(self) -> Steps:
        return METHODS[self.method].build(self)[0]

    @property
    def combiner(self) -> str:
        return METHODS[self.method].build(self)[1]

    def recorded(self) -> dict[str, object]:
        """The parameters that matter for this method (what provenance records)."""
        out: dict[str, object] = {"scale": self.scale}
        if "trim" in self.steps:
            out.update(density=self.density, scope=self.scope)
        if "dare" in self.steps:
            out.update(drop=self.drop, seed=self.seed, then=self.then)
        return out


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[MergeParams], tuple[Steps, str]]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sum", "task arithmetic: base + sum of weighted vectors", lambda p: ((), "sum")),
        Method(
            "ties",
            "TIES: trim to top --density, elect signs, disjoint mean",
            lambda p: (("trim",), "ties"),
        ),
        Method(
            "dare",
            "DARE: drop with prob --drop, rescale 1/(1-p), then --then",
            lambda p: (("dare", "trim") if p.then == "ties" else ("dare",), p.then),
        ),
        Method(
            "magnitude",
            "keep the top --density of each vector by |tau|, then sum",
            lambda p: (("trim",), "sum"),
        ),
        Method(
            "mask",
            "apply each vector's stored importance mask, then sum",
            lambda p: (("mask",), "sum"),
        ),
    )
}


# -- top-k ---------------------------------------------------------------------------------------
def topk_count(n: int, density: float) -> int:
    """How many entries a top-`density` trim keeps out of n: round(density * n), halves up."""
    return min(n, max(0, int(math.floor(density * n + 0.5))))


def _above(a: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """1.0 where a > thr, else 0.0, in a's dtype (float masks: bool kernels are slow on CPU)."""
    return torch.sign(a - thr).clamp_(min=0)


def _take_first_ties(keep: torch.Tensor, a: torch.Tensor, thr: torch.Tensor, budget: int) -> int:
    """Set `keep` to 1 at the first `budget` entries of `a` equal to `thr` (row-major); returns
    how many were set."""
    if budget <= 0:
        return 0
    equal = torch.sign((a - thr).abs_()).neg_().add_(1)  # 1.0 where a == thr
    total = int(equal.sum(dtype=torch.float64))
    if total <= budget:
        keep.add_(equal)
        return total
    idx = equal.reshape(-1).nonzero().reshape(-1)[:budget]
    keep.view(-1)[idx] = 1
    return budget


def topk_weights(a: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 at exactly the k largest entries of `a` (float32, >= 0), else 0.0; ties: lower index
    first. Large tensors use the two-level histogram of the global rule (faster than kthvalue)."""
    n = a.numel()
    if k <= 0 or k >= n:
        return torch.full(a.shape, float(k > 0), dtype=a.dtype)
    if n <= _KTHVALUE_MAX:
        thr = torch.kthvalue(a.reshape(-1), n - k + 1).values
        keep = _above(a, thr)
        _take_first_ties(keep, a, thr, k - int(keep.sum(dtype=torch.float64)))
        return keep
    kth = KthLargest(k, n)
    kth.add_pass1(a)
    kth.end_pass1()
    kth.add_pass2(a)
    return kth.result().weights(a)


def topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """`topk_weights` as a bool mask."""
    return topk_weights(a, k) > 0


_KTHVALUE_MAX = 1 << 17  # below this size kthvalue is faster (measured on CPU)


@dataclass
class GlobalTopK:
    """A vector-wide top-k rule: entries above `value` are kept, plus the first `ties` entries
    equal to it (in key order, then row-major). Call `weights` in that order."""

    value: float | None  # None: keep everything (k = N) or, with keep_none, nothing
    ties: int = 0
    keep_none: bool = False

    def weights(self, a: torch.Tensor) -> torch.Tensor:
        """1.0 where the entry of `a` (float32 magnitudes) is kept, else 0.0."""
        if self.keep_none or self.value is None:
            return torch.full(a.shape, 0.0 if self.keep_none else 1.0, dtype=a.dtype)
        thr = torch.tensor(self.value, dtype=a.dtype)
        keep = _above(a, thr)
        if self.ties > 0:
            self.ties -= _take_first_ties(keep, a, thr, self.ties)
        return keep

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        return self.weights(a) > 0


class KthLargest:
    """Exact k-th largest of a stream of float32 magnitudes, without holding them.

    Non-negative float32 values order like their int32 bit patterns. Pass 1 counts the top 16
    bits (65,536 buckets) to find the bucket holding the k-th largest; pass 2 counts the low 15
    bits of the values in that bucket only. Memory: two small count arrays; cost: two reads.
    """

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.hi = torch.zeros(1 << 16, dtype=torch.int64)
        self.lo = torch.zeros(1 << 15, dtype=torch.int64)
        self.bucket = -1
        self.above = 0  # entries in buckets above `bucket`

    @property
    def needs_passes(self) -> bool:
        return 0 < self.k < self.n

    @staticmethod
    def _bits(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(-1).view(torch.int32)

    def add_pass1(self, a: torch.Tensor) -> None:
        self.hi += torch.bincount(self._bits(a) >> 15, minlength=1 << 16)

    @staticmethod
    def _locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
        """(bin holding the k-th largest, count in the bins above it)."""
        top = torch.cumsum(counts.flip(0), 0)  # top[j]: count in the j+1 highest bins
        j = int(torch.searchsorted(top, k))
        return counts.numel() - 1 - j, int(top[j - 1]) if j else 0

    def end_pass1(self) -> None:
        self.bucket, self.above = self._locate(self.hi, self.k)

    def add_pass2(self, a: torch.Tensor) -> None:
        bits = self._bits(a)
        inside = bits[(bits >> 15) == self.bucket]
        if inside.numel():
            self.lo += torch.bincount(inside & 0x7FFF, minlength=1 << 15)

    def result(self) -> GlobalTopK:
        if self.k <= 0:
            return GlobalTopK(value=None, keep_none=True)
        if self.k >= self.n:
            return GlobalTopK(value=None)
        need = self.k - self.above
        low, above = self._locate(self.lo, need)
        bits = torch.tensor([(self.bucket << 15) | low], dtype=torch.int32)
        return GlobalTopK(value=float(bits.view(torch.float32)[0]), ties=need - above)


# -- DARE ----------------------------------------------------------------------------------------
def dare_seed(seed: int, vector: str, key: str) -> int:
    """Generator seed for one (vector, tensor): the run's seed, the vector digest and the name."""
    return (seed * 1_000_003 + zlib.crc32(f"{vector}/{key}".encode())) % (2**63)


def dare(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Drop each entry with probability p, rescale the survivors by 1/(1-p) (in place):
    entry i survives when u_i >= p, u = torch.rand(n) from a generator seeded with `seed`."""
    if p <= 0.0:
        return x
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(x.shape, generator=g, dtype=torch.float32)
    keep = u.sub_(p).sign_().add_(1).clamp_(max=1)  # 1.0 where u >= p (float: fast on CPU)
    return x.div_(1.0 - p).mul_(keep)


# -- per-term steps and combiners ------------------------------------------------------------------
@dataclass
class TermState:
    """What the steps need to know about one term while merging."""

    vector: str  # digest
    weight: float
    topk: GlobalTopK | None = None  # set by the global pre-pass


def apply_steps(
    x: torch.Tensor,
    key: str,
    term: TermState,
    steps: Steps,
    params: MergeParams,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `steps` on one term's tensor for `key` (compute dtype in and out). `x` is consumed:
    it may be modified in place (callers pass tensors they own, fresh from a read)."""
    for step in steps:
        if step == "dare":
            x = dare(x, params.drop, dare_seed(params.seed, term.vector, key))
        elif step == "mask":
            x = x.mul_(mask.to(x.dtype).clamp_(max=1)) if mask is not None else x.zero_()
        elif step == "trim":
            a = x.abs().to(torch.float32)
            if params.scope == "global":
                assert term.topk is not None, "global trim needs the pre-pass"
                keep = term.topk.weights(a)
            else:
                keep = topk_weights(a, topk_count(a.numel(), params.density))
            x = x.mul_(keep.to(x.dtype))
        else:  # pragma: no cover - registry and steps are defined together
            raise ValueError(step)
    return x


def ties_combine(xs: list[torch.Tensor]) -> torch.Tensor:
    """TIES on weighted, trimmed tensors: elect sign(sum), mean of the entries agreeing with it.
    Entries whose trimmed values sum to exactly zero get 0."""
    elected = torch.zeros_like(xs[0])
    for x in xs:
        elected += x
    elected = elected.sign_()
    total = torch.zeros_like(xs[0])
    count = torch.zeros_like(xs[0])
    for x in xs:
        agree = torch.sign(x).eq_(elected)  # 1.0 where x is non-zero with the elected sign
        total.addcmul_(x, agree)  # (where the elected sign is 0 the total is 0 anyway)
        count += agree
    return total.div_(count.clamp_(min=1))


def combine(
    base: torch.Tensor, xs: list[torch.Tensor], weights: list[float], combiner: str, scale: float
) -> torch.Tensor:
    """theta for one key: `base + sum_t w_t x_t` (sum) or `base + scale * ties(w_t x_t)` (ties).
    `base` (compute dtype) is updated in place and returned; the `xs` are consumed."""
    if combiner == "sum":
        for x, w in zip(xs, weights, strict=True):
            base.add_(x, alpha=w)
        return base
    if combiner == "ties":
        merged = ties_combine(
            [x.mul_(w) if w != 1.0 else x for x, w in zip(xs, weights, strict=True)]
        )
        return base.add_(merged, alpha=scale)
    raise ValueError(combiner)
