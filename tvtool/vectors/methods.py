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


def _take_first_ties(mask: torch.Tensor, equal: torch.Tensor, budget: int) -> int:
    """Set `mask` at the first `budget` True positions of `equal` (row-major); returns how many."""
    if budget <= 0:
        return 0
    idx = equal.reshape(-1).nonzero().reshape(-1)[:budget]
    mask.view(-1)[idx] = True
    return int(idx.numel())


def topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the k largest entries of `a` (float32, >= 0); ties: lower index
    first. Large tensors use the two-level histogram of the global rule (faster than kthvalue)."""
    n = a.numel()
    if k <= 0 or k >= n:
        return torch.full(a.shape, k > 0, dtype=torch.bool)
    if n <= _KTHVALUE_MAX:
        thr = torch.kthvalue(a.reshape(-1), n - k + 1).values
        mask = a > thr
        _take_first_ties(mask, a == thr, k - int(mask.sum()))
        return mask
    kth = KthLargest(k, n)
    kth.add_pass1(a)
    kth.end_pass1()
    kth.add_pass2(a)
    return kth.result().mask(a)


_KTHVALUE_MAX = 1 << 17  # below this size kthvalue is faster (measured on CPU)


@dataclass
class GlobalTopK:
    """A vector-wide top-k rule: entries above `value` are kept, plus the first `ties` entries
    equal to it (in key order, then row-major). `mask` must be called in that key order."""

    value: float | None  # None: keep everything (k = N) or, with keep_none, nothing
    ties: int = 0
    keep_none: bool = False

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        if self.keep_none:
            return torch.zeros(a.shape, dtype=torch.bool)
        if self.value is None:
            return torch.ones(a.shape, dtype=torch.bool)
        thr = torch.tensor(self.value, dtype=torch.float32)
        mask = a > thr
        if self.ties > 0:
            self.ties -= _take_first_ties(mask, a == thr, self.ties)
        return mask


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
    """Drop each entry with probability p, rescale the survivors by 1/(1-p) (in place)."""
    if p <= 0.0:
        return x
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(x.shape, generator=g, dtype=torch.float32) >= p
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
            x = x.mul_(mask.to(torch.bool)) if mask is not None else x.zero_()
        elif step == "trim":
            a = x.abs().to(torch.float32)
            if params.scope == "global":
                assert term.topk is not None, "global trim needs the pre-pass"
                keep = term.topk.mask(a)
            else:
                keep = topk_mask(a, topk_count(a.numel(), params.density))
            x = x.mul_(keep)
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
