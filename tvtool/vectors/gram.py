"""One streamed pass over the keys of several tensor files: per key, the rows of all holders and
their pairwise sums (Gram matrix, sign agreement), for `inspect` and `select --score norm`.

Two worker threads (one per core) take alternate keys. A worker walks its key in column
slices (`SLICE` columns for 8 rows, fewer for more rows: about 2 MB, so that both workers'
slices stay in the L3 cache; larger slices mean fewer calls, each a hand-over of the GIL): it
reads that slice of every holder's tensor into one small reused [rows, columns] buffer
(positioned reads of just those bytes, `range_reader`; readers without them give the whole
tensor once per key) and reduces it while it is in the cache, so each element comes from the
page cache once and from memory never again. At most two keys are in
flight (O(largest tensor x vectors) even on the fallback path; `keep_rows` keeps a key's rows).

Gram matrix: float32 products of `CHUNK`-column slices, summed in float64; norms and cosines
are accurate to about 1e-6 relative, far below anything they are used for, at a fraction of
the cost of a float64 product.

Sign agreement: exact integer counts from packed sign bits s and nonzero bits nz:
    opposite(a, b) = popcount((s_a XOR s_b) AND nz_a AND nz_b)
    both(a, b) = popcount(nz_a AND nz_b),  agree = both - 2 * opposite  (#same - #opposite)
One bit per element: ~8x cheaper than a product of float signs (measured: sign tensors and
their Gram product cost 2x the bits). A slice is first tested for zeros (one compare); the sign
bits of zero-free slices (nz all ones: both = width) wait in a small per-key buffer and are
counted pairwise when it fills; a slice with zeros is counted at once with
its nonzero bits.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tvtool.errors import TvtoolError

CHUNK = 1 << 12  # columns per float32 product (summed in float64)
SLICE = 1 << 16  # columns read and reduced together for 8 rows (x 8/rows: a ~2 MB buffer)
WORKERS = 2  # threads reading and reducing keys (one per core)
PAD = 16  # floats after each row of a slice buffer: rows 2**k floats apart share cache sets


@dataclass
class KeySums:
    gram: torch.Tensor  # [r, r] float64: dot products
    agree: torch.Tensor | None  # [r, r] float64: #same sign - #opposite sign (with signs)
    both: torch.Tensor | None  # [r, r] float64: #both nonzero (with signs)
    nonzero: torch.Tensor | None  # [r] float64: #nonzero per row (with signs)


@dataclass
class KeyRows:
    """Key `key` of every vector that holds it (`holders`: indices into the sources)."""

    key: str
    shape: tuple[int, ...]
    holders: list[int]
    sums: KeySums
    max_abs: list[float]  # per holder (signs=True)
    nonzero: list[int]  # per holder: entries != 0 (signs=True)
    rows: list[torch.Tensor] | None  # the holders' flat float32 tensors (keep_rows=True)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


Reader = Callable[[int, str], torch.Tensor]  # (source index, key) -> tensor
Meta = Callable[[int, str], tuple[int, ...]]  # (source index, key) -> shape
Fill = Callable[[np.ndarray, int], None]  # (float32 numpy row, first element) -> None
Ranged = Callable[[int, str], Fill | None]  # (source index, key) -> a slice reader, or None


def range_reader(reader, key: str) -> Fill | None:
    """`reader.range_reader(key)` when the reader has one (float32 positioned reads)."""
    f = getattr(reader, "range_reader", None)
    return f(key) if f is not None else None


def _shapes(
    keys: Sequence[str], holders_of: Callable[[str], list[int]], shape_of: Meta,
    names: Sequence[str],
) -> dict[str, tuple[tuple[int, ...], list[int]]]:
    """key -> (shape, holders), checking that every holder agrees on the shape."""
    out = {}
    for key in keys:
        holders = holders_of(key)
        shapes = [tuple(shape_of(i, key)) for i in holders]
        if len(set(shapes)) > 1:
            shown = ", ".join(f"{names[i]}: {list(s)}" for i, s in zip(holders, shapes,
                                                                        strict=False))
            raise TvtoolError(f"tensor {key!r} has different shapes across vectors ({shown})")
        out[key] = (shapes[0] if shapes else (0,), holders)
    return out


def _whole(t: torch.Tensor) -> Fill:
    flat = t.detach().reshape(-1).to(torch.float32).numpy()
    return lambda out, lo: np.copyto(out, flat[lo: lo + out.shape[0]])


class _Sums:
    """Running sums of one key's rows, fed slice by slice ([r, w] float32 column slices or any
    tiles laid out alike for every row).

    Per slice, while it is in the cache: its Gram product (`_gram`), max |x| (row min and max),
    one zero test, and its sign bits packed and kept in `bits`, whose pairwise counts are
    taken when they add up to `PAIR_BITS` bytes per row, or at the end: the sign bits are 32x
    smaller than the slice, so batching them costs no memory traffic and saves calls. A slice
    with zeros is counted at once with its nonzero mask (padding bits are 0 in both rows, so
    they count nowhere)."""

    def __init__(self, r: int, width: int, signs: bool):
        self.gram = np.zeros((r, r), dtype=np.float64)
        self.n, self.signs = 0, signs
        if signs:
            self.opposite = np.zeros((r, r), dtype=np.int64)
            self.both = np.zeros((r, r), dtype=np.int64)
            self.nonzero = np.zeros(r, dtype=np.int64)
            self.max_abs = np.zeros(r, dtype=np.float32)
            self.scratch = np.empty((r, width), dtype=bool)
            self.bits: list[np.ndarray] = []  # packed sign bits of zero-free slices
            self.fill = 0  # bytes per row in `bits`
            self.dense = 0  # columns whose sign bits wait in `bits`

    def add(self, xs: torch.Tensor, xn: np.ndarray | None = None) -> None:
        """Add one slice (`xs`; `xn`: a numpy view of it, if at hand)."""
        xn = xs.numpy() if xn is None else xn
        _gram(xn, self.gram)
        w = xn.shape[1]
        self.n += w
        if not self.signs or not w:
            return
        np.maximum(self.max_abs, np.maximum(-xn.min(axis=1), xn.max(axis=1)), out=self.max_abs)
        if self.scratch.shape[1] < w:
            self.scratch = np.empty((xn.shape[0], w), dtype=bool)
        scratch = self.scratch[:, :w]
        if not np.equal(xn, 0, out=scratch).any():  # no zeros: only the sign bits matter
            sign = np.packbits(np.signbit(xn, out=scratch), axis=1)
            self.bits.append(sign)
            self.fill += sign.shape[1]
            self.dense += w
            if self.fill >= PAIR_BITS:
                self._pairs()
            self.nonzero += w
            return
        nz = _words(np.packbits(np.logical_not(scratch, out=scratch), axis=1))
        sign = _words(np.packbits(np.signbit(xn, out=scratch), axis=1))
        self.nonzero += np.bitwise_count(nz).sum(axis=1, dtype=np.int64)
        self.both += _popcounts(nz, None, both=True)
        self.opposite += _popcounts(sign, nz)

    def _pairs(self) -> None:
        """Count the sign bits waiting in `bits` (rows without zeros there) pairwise."""
        if not self.dense:
            return
        pad = -self.fill % 8  # zero bytes up to a whole word count nowhere
        if pad:
            self.bits.append(np.zeros((self.bits[0].shape[0], pad), dtype=np.uint8))
        bits = self.bits[0] if len(self.bits) == 1 else np.concatenate(self.bits, axis=1)
        self.opposite += _popcounts(bits.view(np.uint64), None)
        self.both += self.dense
        self.bits, self.fill, self.dense = [], 0, 0

    def finish(self) -> tuple[KeySums, list[float], list[int]]:
        """(the sums, max |x| per row, nonzero count per row)."""
        g, r = torch.from_numpy(self.gram), self.gram.shape[0]
        if not self.signs:
            return KeySums(g, None, None, None), [0.0] * r, [0] * r
        self._pairs()
        both = torch.from_numpy(self.both).to(torch.float64)
        agree = both - 2 * torch.from_numpy(self.opposite).to(torch.float64)
        sums = KeySums(g, agree, both, torch.from_numpy(self.nonzero).to(torch.float64))
        return sums, [float(m) for m in self.max_abs], [int(c) for c in self.nonzero]


def _gram(xn: np.ndarray, out: np.ndarray) -> None:
    """out += xn @ xn.T for a float32 [r, w] slice: the float32 products of its `CHUNK`-column
    pieces in one batched call (torch's BLAS: numpy's OpenBLAS serialises the two workers),
    summed in float64."""
    xs = torch.from_numpy(xn)
    r, w = xs.shape
    nc = w // CHUNK
    if nc:
        pieces = xs[:, : nc * CHUNK].view(r, nc, CHUNK).transpose(0, 1)  # [nc, r, CHUNK]
        out += torch.bmm(pieces, pieces.transpose(1, 2)).sum(0, dtype=torch.float64).numpy()
    if nc * CHUNK < w:
        p = xs[:, nc * CHUNK:]
        out += (p @ p.T).numpy()


def tile_sums(
    tiles: Iterable[torch.Tensor], r: int, signs: bool = True
) -> tuple[KeySums, list[float], list[int]]:
    """The sums of one key given as float32 [r, w] tiles (every row's entries in the same
    order): (sums, max |x| per row, nonzero count per row)."""
    sums = _Sums(r, 0, signs)
    for tile in tiles:
        sums.add(tile.contiguous())
    return sums.finish()


def _work(
    key: str, plan, get: Reader, ranged: Ranged | None, local, keep_rows: bool, signs: bool,
) -> KeyRows:
    """Read and reduce one key in a worker (`local`: the worker's own slice buffer)."""
    shape, holders = plan[key]
    n, r = math.prod(shape), len(holders)
    step = max(8, SLICE * 8 // max(r, 1) // 8 * 8)  # whole bytes of sign bits
    fills = []
    for i in holders:
        f = ranged(i, key) if ranged is not None else None
        fills.append(f if f is not None else _whole(get(i, key)))
    whole = np.empty((r, n), dtype=np.float32) if keep_rows else None
    if whole is None and (getattr(local, "buf", None) is None or local.buf.shape[0] < r):
        local.buf = np.empty((r, step + PAD), dtype=np.float32)
    buf = whole if whole is not None else local.buf
    sums = _Sums(r, min(step, n), signs)
    for lo in range(0, n, step):
        w = min(step, n - lo)
        xn = buf[:r, lo: lo + w] if whole is not None else buf[:r, :w]
        for j in range(r):
            fills[j](xn[j], lo)
        sums.add(torch.from_numpy(xn), xn)
    del fills  # the fallback's whole tensors
    done, max_abs, nonzero = sums.finish()
    return KeyRows(key, shape, holders, done, max_abs, nonzero,
                   list(torch.from_numpy(whole).unbind(0)) if whole is not None else None)


def stream_keys(
    keys: Sequence[str],
    holders_of: Callable[[str], list[int]],
    get: Reader,
    shape_of: Meta,
    names: Sequence[str],
    keep_rows: bool = False,
    ranged: Ranged | None = None,
    signs: bool = True,
) -> Iterator[KeyRows]:
    """KeyRows of every key in order, with their `sums`, read and reduced by two worker
    threads; the caller only takes the (small) results. `ranged` gives a slice reader for
    (source, key) where one exists (else `get` is called once per key). With `signs`, the sums
    include sign agreement and the rows' max |x| and nonzero counts."""
    if not keys:
        return
    plan = _shapes(keys, holders_of, shape_of, names)
    workers = min(WORKERS, len(keys))
    ahead = workers if keep_rows else 2 * workers  # keys in flight
    local = threading.local()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tvtool-read") as pool:

        def submit(k: int):
            return pool.submit(_work, keys[k], plan, get, ranged, local, keep_rows, signs)

        pending = deque(submit(k) for k in range(min(ahead, len(keys))))
        for k in range(len(keys)):
            current = pending.popleft().result()
            if k + ahead < len(keys):
                pending.append(submit(k + ahead))
            yield current
            del current


def _words(bits: np.ndarray) -> np.ndarray:
    """Packed bits [r, bytes] as 64-bit words where they divide evenly (8x fewer elements)."""
    return bits.view(np.uint64) if bits.shape[1] % 8 == 0 else bits


PAIR_BITS = 1 << 15  # bytes of sign bits per row batched before they are counted pairwise
PAIR_BLOCK = 1 << 20  # words of the [rows, r, words] temporaries in `_popcounts`


def _popcounts(bits: np.ndarray, mask: np.ndarray | None, both: bool = False) -> np.ndarray:
    """[r, r] int64: popcount(bits_a XOR bits_b (AND mask_a AND mask_b)), diagonal 0; with
    `both`, popcount(bits_a AND bits_b) instead. Rows against all rows at once, in blocks: a
    few large calls rather than one per pair (each call hands the GIL over)."""
    r, words = bits.shape
    out = np.empty((r, r), dtype=np.int64)
    step = max(1, PAIR_BLOCK // max(1, r * words))
    for a in range(0, r, step):
        lo = bits[a: a + step, None, :]
        d = np.bitwise_and(lo, bits[None]) if both else np.bitwise_xor(lo, bits[None])
        if mask is not None:
            d &= mask[a: a + step, None, :]
            d &= mask[None]
        out[a: a + step] = np.bitwise_count(d).sum(axis=2, dtype=np.int64)
    return out
