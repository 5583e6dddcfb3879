"""Exact top-k by magnitude, per tensor or streamed over a whole vector (the `trim` of TIES).

Count: k = int(density * N) (truncation, as in the TIES paper, peft and mergekit; N: entries of
the whole vector for scope `global`, of the tensor for scope `tensor`). Among entries of equal
magnitude at the threshold, earlier ones win: tensors in key order (sorted names), then
row-major index. The global threshold is found exactly with bounded memory by `BandKth` (one
streamed pass: a band around a sample's estimate, counted and collected) or, when the band
misses, by `KthLargest` (two streamed passes of histograms over the float32 bit patterns).
`BandKth` also says which piece of the stream holds the last tie its rule keeps (`tie_piece`);
the caller reads that piece again to find where the kept ties end (`GlobalTopK.cut`): every
tensor, and every slice of it, then has a rule of its own (`GlobalTopK.at`, `slice_rule`) and
can be trimmed in any order, in parallel.
A tensor's own threshold comes from one in-place selection of its magnitudes' bit patterns
(`partition_rule`); where only some of its ties are kept, `ties_cut` finds the index where
they stop, so that its column slices can be trimmed independently (`slice_rule`).
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


def topk_rule(a: torch.Tensor, k: int, *, scratch: bool = False) -> GlobalTopK:
    """The top-k rule of one in-memory tensor of float32 magnitudes: kthvalue when small, else
    one in-place selection of their bit patterns (`partition_rule`; with `scratch` a's own
    bytes are reordered, else a copy's)."""
    n = a.numel()
    flat = a.reshape(-1)
    if k <= 0 or k >= n:
        return GlobalTopK(value=None, keep_none=k <= 0)
    if n <= _KTHVALUE_MAX:
        v = torch.kthvalue(flat, n - k + 1).values
        above, equal = int((flat > v).sum()), int((flat == v).sum())
        return GlobalTopK(value=float(v), ties=k - above, equal=equal)
    return partition_rule(flat if scratch and flat.is_contiguous() else flat.clone(), k)


def partition_rule(a: torch.Tensor, k: int) -> GlobalTopK:
    """The top-k rule (0 < k < n) of the float32 magnitudes `a` (flat, contiguous, >= 0; its
    bytes are reordered): non-negative float32 order like their int32 bit patterns, so numpy's
    vectorised in-place partition of the bits puts the k-th largest at index n - k with the
    smaller ones before it and the larger ones after (measured ~20x faster than kthvalue); one
    counting pass of the values equal to it follows."""
    n = a.numel()
    bits = a.view(torch.int32).numpy()
    j = n - k
    bits.partition(j)
    v = bits[j]
    upper = int(np.count_nonzero(bits[j + 1 :] == v))  # the others above j are larger
    lower = int(np.count_nonzero(bits[:j] == v)) if j and bits[:j].max() == v else 0
    value = float(np.array([v], dtype=np.int32).view(np.float32)[0])
    return GlobalTopK(value=value, ties=1 + upper, equal=lower + 1 + upper)


def ties_cut(x: torch.Tensor, rule: GlobalTopK) -> int:
    """For an `ordered` rule of one tensor: the index just past the `rule.ties`-th entry of x
    (flat, row-major) whose float32 magnitude equals the threshold, so that the rule keeps
    |x| >= value before it and |x| > value from it on (`CutRule`). Scanned in pieces, stopping
    at the cut."""
    xs = x.reshape(-1)
    need, v = rule.ties, np.float32(rule.value)
    step = 1 << 16
    for lo in range(0, xs.numel(), step):
        piece = xs[lo : lo + step]
        mag = np.abs(piece.numpy() if piece.dtype == torch.float32 else
                     piece.to(torch.float32).numpy())
        eq = mag == v
        got = int(np.count_nonzero(eq))
        if got >= need:
            return lo + int(np.flatnonzero(eq)[need - 1]) + 1
        need -= got
    return xs.numel()  # pragma: no cover - the rule counted them


@dataclass(frozen=True)
class CutRule:
    """One row's per-tensor trim in one slice where its ties at the threshold stop (`ties_cut`,
    relative to the slice): |x| >= `before` at columns below `cut`, |x| >= `after` from it on
    (inclusive bounds, as `GlobalTopK.bound`)."""

    before: float
    after: float
    cut: int
    ordered = False


def slice_rule(rule: GlobalTopK | None, cut: int | None, lo: int, hi: int):
    """The rule of columns [lo, hi) of a row whose per-tensor rule is `rule`, its ties ending at
    `cut` (None: the rule is not `ordered`): the rule itself, every tie kept, none, or a
    `CutRule`."""
    if cut is None or rule is None:
        return rule
    if hi <= cut:
        return GlobalTopK(value=rule.value, ties=rule.equal, equal=rule.equal)
    strict = GlobalTopK(value=rule.value, ties=0, equal=rule.equal)
    if lo >= cut:
        return strict
    return CutRule(rule.value, strict.bound(), cut - lo)


def topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """`topk_weights` as a bool mask."""
    return topk_weights(a, k) > 0


_KTHVALUE_MAX = 1 << 17  # up to this size: kthvalue (float semantics, as before)
SAMPLE = 1 << 20  # magnitudes sampled to place BandKth's band (a vector)


@dataclass
class GlobalTopK:
    """A vector-wide top-k rule: entries above `value` are kept, plus the first `ties` entries
    equal to it (in key order, then row-major). Call `weights` in that order."""

    value: float | None  # None: keep everything (k = N) or, with keep_none, nothing
    ties: int = 0
    keep_none: bool = False
    equal: int | None = None  # entries equal to `value` in the whole vector (None: unknown)
    cut: int | None = None  # for an `ordered` rule, if known: the vector position (keys in
    # order, then row-major) just past the last tie kept (`at` resolves it per tensor)

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

    def at(self, offset: int, n: int) -> tuple[GlobalTopK, int | None]:
        """The rule of the tensor at vector positions [offset, offset + n), and where in it the
        kept ties stop (for `slice_rule`; None: nowhere), when `cut` is known: a rule that no
        longer depends on the order the tensors are trimmed in, so its slices can be trimmed
        in parallel. An `ordered` rule without `cut` is returned as it is."""
        if not self.ordered or self.cut is None:
            return self, None
        if offset + n <= self.cut:
            return GlobalTopK(value=self.value, ties=self.equal, equal=self.equal), None
        if offset >= self.cut:
            return GlobalTopK(value=self.value, ties=0, equal=self.equal), None
        return self, self.cut - offset

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

        ranks = [r for r in (r_hi, r_lo) if 1 <= r <= m]
        sample_bits = s.view(torch.int32).numpy() & self.TOP  # a new array
        if ranks:  # one in-place selection (bit patterns order like the magnitudes)
            sample_bits.partition(sorted({m - r for r in ranks}))

        def bits(rank: int, default: int) -> int:  # bit pattern of the sample's rank-th largest
            return int(sample_bits[m - rank]) if 1 <= rank <= m else default

        self.hi = bits(r_hi, self.TOP)
        self.lo = bits(r_lo, 0)
        self.above = 0  # entries with bits > hi
        self.parts: list[np.ndarray] = []  # bits - lo of the entries inside the band
        self.where: list[int] = []  # the first stream position of each part's piece
        self.inside = 0
        self.failed = False

    @property
    def needs_passes(self) -> bool:
        return 0 < self.k < self.n

    def add(self, a: torch.Tensor, offset: int | None = None) -> None:
        """Count and collect one piece of the stream (float32 magnitudes, any shape). With
        `offset` (the piece's first position in the stream) on every call, `tie_piece` can
        say which piece holds the last tie the rule keeps."""
        if self.failed:
            return
        u = a.detach().reshape(-1).contiguous().view(torch.int32).numpy().view(np.uint32)
        self.above += int(np.count_nonzero(u > self.hi))
        d = u - np.uint32(self.lo)  # wraps below lo: one unsigned comparison finds the band
        band = d[d <= np.uint32(self.hi - self.lo)]
        self.inside += band.size
        if self.inside > self.n // 4 + 4096:  # a useless band: hand over to the two passes
            self.failed, self.parts, self.where = True, [], []
        elif band.size:
            self.parts.append(band)
            if offset is not None:
                self.where.append(offset)

    def tie_piece(self, rule: GlobalTopK) -> tuple[int, int] | None:
        """For an `ordered` rule from `result`: (the offset of the piece holding the last tie it
        keeps, how many of that piece's ties are kept); None without offsets. The caller finds
        the position in that piece (`ties_cut`) and sets `rule.cut`."""
        if not rule.ordered or not self.parts or len(self.where) != len(self.parts):
            return None
        value = np.array([rule.value], dtype=np.float32).view(np.uint32)[0]
        d, need = np.uint32(value - np.uint32(self.lo)), rule.ties
        for offset, part in zip(self.where, self.parts, strict=True):
            got = int(np.count_nonzero(part == d))
            if got >= need:
                return offset, need
            need -= got
        return None  # pragma: no cover - `result` counted them

    def result(self) -> GlobalTopK | None:
        if self.k <= 0:
            return GlobalTopK(value=None, keep_none=True)
        if self.k >= self.n:
            return GlobalTopK(value=None)
        need = self.k - self.above
        if self.failed or need <= 0 or need > self.inside:
            return None
        band = np.concatenate(self.parts)  # (bits - lo), < 2^31
        j = band.size - need
        d = band[j] if band.size == 1 else np.partition(band, j)[j]  # the need-th largest
        above = self.above + int(np.count_nonzero(band > d))
        equal = int(np.count_nonzero(band == d))
        value = np.array([self.lo + int(d)], dtype=np.uint32).view(np.float32)
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


def shrink_rows(x: torch.Tensor, rules: list, out: torch.Tensor) -> None:
    """`trim_rows` of a float32 stack x ([T, c], in place) by rules that are not `ordered`
    (`GlobalTopK` or `CutRule`), with `out` (float32, [T, c]) as the mask: |x| into it, one
    comparison against the per-row bounds (a `CutRule` row's columns from its cut compared
    again against their own bound), one product. Bit for bit `trim_rows`."""
    torch.abs(x, out=out)
    cut = [(r, ru) for r, ru in enumerate(rules) if isinstance(ru, CutRule)]
    bounds = [ru.before if isinstance(ru, CutRule) else ru.bound() for ru in rules]
    for r, ru in cut:
        tail = out[r, ru.cut :]
        torch.ge(tail, torch.tensor(ru.after, dtype=torch.float32), out=tail)
        bounds[r] = None
    if not cut:
        torch.ge(out, torch.tensor(bounds, dtype=torch.float32).reshape(-1, 1), out=out)
    else:
        for r, (ru, bound) in enumerate(zip(rules, bounds, strict=True)):
            head = out[r, : ru.cut] if isinstance(ru, CutRule) else out[r]
            torch.ge(head, torch.tensor(ru.before if bound is None else bound,
                                        dtype=torch.float32), out=head)
    x.mul_(out)


def trim(x: torch.Tensor, density: float, rule: GlobalTopK | None) -> torch.Tensor:
    """Keep the top entries of `x` by |x| (in place): by the vector-wide `rule` when given (scope
    global, from the pre-pass), else the top int(density * n) of this tensor."""
    a = x.abs().to(torch.float32)
    keep = rule.weights(a) if rule is not None else topk_weights(a, topk_count(a.numel(), density))
    return x.mul_(keep if keep.dtype == x.dtype else keep.to(x.dtype))
