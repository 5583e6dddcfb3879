"""Exact top-k by magnitude, per tensor or streamed over a whole vector (the `trim` of TIES).

Count: k = int(density * N) (truncation, as in the TIES paper, peft and mergekit; N: entries of
the whole vector for scope `global`, of the tensor for scope `tensor`). Among entries of equal
magnitude at the threshold, earlier ones win: tensors in key order (sorted names), then
row-major index. The global threshold is found exactly with bounded memory by `BandKth` (one
streamed pass: a band around a sample's estimate, counted and collected) or, when the band
misses, by `KthLargest` (two streamed passes of histograms over the float32 bit patterns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def topk_count(n: int, density: float) -> int:
    """How many entries a top-`density` trim keeps out of n: int(density * n), in [0, n]."""
    return min(n, max(0, int(density * n)))


def _above(a: torch.Tensor, thr: torch.Tensor, *, inclusive: bool = False) -> torch.Tensor:
    """1.0 where a > thr (a >= thr with `inclusive`), else 0.0, in a's dtype: comparisons
    written into a float tensor (bool masks and their conversions are several times slower on
    CPU, measured)."""
    return (torch.ge if inclusive else torch.gt)(a, thr, out=torch.empty_like(a))


def _take_first_ties(keep: torch.Tensor, a: torch.Tensor, thr: torch.Tensor, budget: int) -> int:
    """Set `keep` to 1 at the first `budget` entries of `a` equal to `thr` (row-major); returns
    how many were set."""
    if budget <= 0:
        return 0
    equal = torch.eq(a, thr, out=torch.empty_like(a))  # 1.0 where a == thr
    total = int(equal.sum(dtype=torch.float64))
    if total <= budget:
        keep.add_(equal)
        return total
    idx = equal.reshape(-1).nonzero().reshape(-1)[:budget]
    keep.view(-1)[idx] = 1
    return budget


def topk_weights(a: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 at exactly the k largest entries of `a` (float32, >= 0), else 0.0; ties: lower index
    first."""
    return topk_rule(a, k).weights(a)


def topk_rule(a: torch.Tensor, k: int) -> GlobalTopK:
    """The top-k rule of one in-memory tensor of float32 magnitudes: kthvalue when small, else
    one band pass around the estimate of a strided sample (two histogram passes if it misses)."""
    n = a.numel()
    flat = a.reshape(-1)
    if k <= 0 or k >= n:
        return GlobalTopK(value=None, keep_none=k <= 0)
    if n <= _KTHVALUE_MAX:
        v = torch.kthvalue(flat, n - k + 1).values
        above, equal = int((flat > v).sum()), int((flat == v).sum())
        return GlobalTopK(value=float(v), ties=k - above, equal=equal)
    step = max(1, n // TENSOR_SAMPLE)  # TENSOR_SAMPLE to 2x: the band is as narrow in ranks
    band = BandKth(k, n, flat[step // 2 :: step].contiguous(), exact=step == 1)
    for lo in range(0, n, 1 << 20):
        band.add(flat[lo : lo + (1 << 20)])
    rule = band.result()
    if rule is None:
        kth = KthLargest(k, n)
        kth.add_pass1(flat)
        kth.end_pass1()
        kth.add_pass2(flat)
        rule = kth.result()
    return rule


def topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """`topk_weights` as a bool mask."""
    return topk_weights(a, k) > 0


_KTHVALUE_MAX = 1 << 17  # below this size kthvalue is faster (measured on CPU)
SAMPLE = 1 << 20  # magnitudes sampled to place BandKth's band (a vector)
TENSOR_SAMPLE = 1 << 16  # (one tensor: this many to twice as many)


@dataclass
class GlobalTopK:
    """A vector-wide top-k rule: entries above `value` are kept, plus the first `ties` entries
    equal to it (in key order, then row-major). Call `weights` in that order."""

    value: float | None  # None: keep everything (k = N) or, with keep_none, nothing
    ties: int = 0
    keep_none: bool = False
    equal: int | None = None  # entries equal to `value` in the whole vector (None: unknown)

    def weights(self, a: torch.Tensor) -> torch.Tensor:
        """1.0 where the entry of `a` (float32 magnitudes) is kept, else 0.0."""
        if self.keep_none or self.value is None:
            return torch.full(a.shape, 0.0 if self.keep_none else 1.0, dtype=a.dtype)
        thr = torch.tensor(self.value, dtype=a.dtype)
        if self.equal is not None and self.ties >= self.equal:  # every tie is kept: no order
            return _above(a, thr, inclusive=True)
        keep = _above(a, thr)
        if self.ties > 0:
            self.ties -= _take_first_ties(keep, a, thr, self.ties)
        return keep

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        return self.weights(a) > 0

    @property
    def ordered(self) -> bool:
        """Whether some ties are kept and others not (the lower-index-first scan is needed)."""
        return (
            self.value is not None and not self.keep_none and self.ties > 0
            and (self.equal is None or self.ties < self.equal)
        )

    def bound(self) -> float:
        """The rule as one inclusive bound on magnitudes (a >= bound), for rules that are not
        `ordered`: NaN keeps nothing, 0 everything, the next float32 up means `> value`."""
        if self.keep_none:
            return math.nan
        if self.value is None:
            return 0.0
        if self.equal is not None and self.ties >= self.equal:
            return self.value
        v = np.float32(self.value)
        return float(np.nextafter(v, np.float32(np.inf)))


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
        return GlobalTopK(
            value=float(bits.view(torch.float32)[0]), ties=need - above, equal=int(self.lo[low])
        )



class BandKth:
    """Exact k-th largest of a stream of float32 magnitudes in one pass, given a sample.

    The sample (`m` of the n values, spread over the stream) places a band [lo, hi] of float32
    bit patterns that holds the k-th largest unless the sample misleads: its rank k*m/n, give or
    take 12 binomial standard deviations (room for sampled runs of correlated entries) plus
    0.1% of m. The pass counts the entries above the band and collects those inside; the k-th
    largest is then a kthvalue of the collected ones. `result` is None when the band missed
    (or collected more than a quarter of the stream): the caller falls back to `KthLargest`.
    With `exact` (the sample is the whole stream) the band is the k-th value itself.
    """

    TOP = 0x7FFFFFFF

    def __init__(self, k: int, n: int, sample: torch.Tensor, exact: bool = False):
        self.k, self.n = k, n
        s = sample.reshape(-1).to(torch.float32)
        m = s.numel()
        if exact:
            r_hi = r_lo = k
        else:
            q = k / n
            half = 12.0 * math.sqrt(m * q * (1.0 - q)) + 0.001 * m + 16.0
            r_hi, r_lo = math.ceil(q * m - half), math.floor(q * m + half)  # ranks from the top

        def bits(rank: int, default: int) -> int:  # bit pattern of the sample's rank-th largest
            if rank < 1 or rank > m:
                return default
            v = torch.kthvalue(s, m - rank + 1).values
            return int(v.view(torch.int32)) & self.TOP

        self.hi = bits(r_hi, self.TOP)
        self.lo = bits(r_lo, 0)
        self.above = 0  # entries with bits > hi
        self.parts: list[np.ndarray] = []  # bits - lo of the entries inside the band
        self.inside = 0
        self.failed = False

    @property
    def needs_passes(self) -> bool:
        return 0 < self.k < self.n

    def add(self, a: torch.Tensor) -> None:
        """Count and collect one piece of the stream (float32 magnitudes, any shape)."""
        if self.failed:
            return
        u = a.detach().reshape(-1).contiguous().view(torch.int32).numpy().view(np.uint32)
        self.above += int(np.count_nonzero(u > self.hi))
        d = u - np.uint32(self.lo)  # wraps below lo: one unsigned comparison finds the band
        band = d[d <= np.uint32(self.hi - self.lo)]
        self.inside += band.size
        if self.inside > self.n // 4 + 4096:  # a useless band: hand over to the two passes
            self.failed, self.parts = True, []
        elif band.size:
            self.parts.append(band)

    def result(self) -> GlobalTopK | None:
        if self.k <= 0:
            return GlobalTopK(value=None, keep_none=True)
        if self.k >= self.n:
            return GlobalTopK(value=None)
        need = self.k - self.above
        if self.failed or need <= 0 or need > self.inside:
            return None
        band = torch.from_numpy(np.concatenate(self.parts).view(np.int32))
        d = torch.kthvalue(band, band.numel() - need + 1).values  # (bits - lo), need-th largest
        above = self.above + int((band > d).sum())
        equal = int((band == d).sum())
        value = torch.tensor([self.lo + int(d)], dtype=torch.int32).view(torch.float32)
        return GlobalTopK(value=float(value[0]), ties=self.k - above, equal=equal)


def trim_rows(x: torch.Tensor, rules: list[GlobalTopK]) -> torch.Tensor:
    """`trim` of each row of x ([T, c], in place) by its rule, in one pass over the stack:
    one magnitude tensor, one comparison against per-row bounds, one product. Rows whose
    rule keeps only some ties at the threshold are finished in index order. Returns a
    scratch tensor of x's shape (float32), free for the caller."""
    a = x.abs() if x.dtype == torch.float32 else x.abs().to(torch.float32)
    bounds = torch.tensor([r.bound() for r in rules], dtype=torch.float32).reshape(-1, 1)
    ordered = [i for i, r in enumerate(rules) if r.ordered]
    keep = torch.ge(a, bounds, out=a if not ordered else torch.empty_like(a))
    for i in ordered:
        keep[i] = rules[i].weights(a[i])
    x.mul_(keep if keep.dtype == x.dtype else keep.to(x.dtype))
    return keep


def trim(x: torch.Tensor, density: float, rule: GlobalTopK | None) -> torch.Tensor:
    """Keep the top entries of `x` by |x| (in place): by the vector-wide `rule` when given (scope
    global, from the pre-pass), else the top int(density * n) of this tensor."""
    a = x.abs().to(torch.float32)
    keep = rule.weights(a) if rule is not None else topk_weights(a, topk_count(a.numel(), density))
    return x.mul_(keep if keep.dtype == x.dtype else keep.to(x.dtype))
