"""Exact top-k by magnitude, per tensor or streamed over a whole vector (the `trim` of TIES).

Count: k = int(density * N) (truncation, as in the TIES paper, peft and mergekit; N: entries of
the whole vector for scope `global`, of the tensor for scope `tensor`). Among entries of equal
magnitude at the threshold, earlier ones win: tensors in key order (sorted names), then
row-major index. The global threshold is found exactly with bounded memory by `KthLargest` (two
streamed passes of histograms over the float32 bit patterns).
"""

from __future__ import annotations

from dataclasses import dataclass

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




def trim(x: torch.Tensor, density: float, rule: GlobalTopK | None) -> torch.Tensor:
    """Keep the top entries of `x` by |x| (in place): by the vector-wide `rule` when given (scope
    global, from the pre-pass), else the top int(density * n) of this tensor."""
    a = x.abs().to(torch.float32)
    keep = rule.weights(a) if rule is not None else topk_weights(a, topk_count(a.numel(), density))
    return x.mul_(keep if keep.dtype == x.dtype else keep.to(x.dtype))
