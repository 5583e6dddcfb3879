"""The stacked fast path of `merge` (methods with `Method.stacked`: TIES), in slices.

Per output slice the base slice and every term's slice are read (positioned reads, straight
into one [T, c] tensor) on a reader thread while the previous slice is computed, so reading,
the base's hashing and the arithmetic overlap; `combine_rows` then trims, elects and merges the
stack in a few passes over cache-sized data (c = 2^19 / T elements: the whole stack fits in
L2/L3; measured 5-8x faster per element than 1 MB rows on this machine).

Global trims need each vector's exact top-k threshold first (`band_thresholds`): a sample of
`SAMPLE` magnitudes (pages of `PAGE` entries spread over the vector) places a narrow band, one
streamed pass counts the entries above it and collects those inside (`topk.BandKth`), and the
threshold is exact; only if the band missed does that vector take the two histogram passes.
Vectors are spread over `workers()` Python threads (numpy, torch and preadv release the GIL).
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from tvtool.vectors.merge_digests import feed
from tvtool.vectors.methods.base import TensorInfo
from tvtool.vectors.methods.topk import (
    SAMPLE,
    BandKth,
    GlobalTopK,
    KthLargest,
    slice_rule,
    ties_cut,
    topk_count,
    topk_rule,
)

if TYPE_CHECKING:
    from tvtool.vectors.merge_stream import MergeInputs, Progress
    from tvtool.vectors.slice_reader import SliceReader

PAGE = 1024  # consecutive entries per sampled page


def workers() -> int:
    """Threads a merge may use: torch's intra-op thread count (OMP_NUM_THREADS), at most 2.
    The merge runs its torch ops on one intra-op thread each meanwhile (`single_threaded`):
    OpenMP teams started from two Python threads oversubscribe the cores (measured: 20x
    slower on a loaded 2-core machine)."""
    return max(1, min(2, torch.get_num_threads()))


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one intra-op thread for the duration (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def span(terms: int, chunk: int) -> int:
    """Slice length of a stack of `terms` rows: about 2 MB of float32 in all."""
    return max(1, min(chunk, max(1 << 12, (1 << 19) // max(1, terms))))


def _sample(inp: MergeInputs, i: int, base: SliceReader | None) -> tuple[torch.Tensor, bool]:
    """Magnitudes of about SAMPLE entries of term i, pages spread evenly over its keys in
    order (all of them when the vector is small: then the band is exact)."""
    t = inp.plan.terms[i]
    sizes = [inp.base.meta(k).numel for k in t.keys]
    if t.numel <= 2 * SAMPLE:
        parts = [x.abs() for k in t.keys for x in inp.term_slices(i, k, base)]
        return (torch.cat(parts) if parts else torch.zeros(0)).to(torch.float32), True
    pages = SAMPLE // PAGE
    parts, key_i, start = [], 0, 0
    for j in range(pages):
        g = (2 * j + 1) * t.numel // (2 * pages)
        while g >= start + sizes[key_i]:
            start += sizes[key_i]
            key_i += 1
        lo = g - start
        hi = min(sizes[key_i], lo + PAGE)
        x = inp.term_slice(i, t.keys[key_i], lo, hi, base)
        parts.append(x.abs().to(torch.float32))
    return torch.cat(parts), False


def _threshold(inp: MergeInputs, i: int, density: float, progress: Progress) -> None:
    """Term i's global top-k rule (BandKth, else the two histogram passes)."""
    t = inp.plan.terms[i]
    k = topk_count(t.numel, density)
    base = inp.base_slices() if inp.is_ckpt[i] else None  # this thread's own reader
    try:
        sample, exact = _sample(inp, i, base)
        band = BandKth(k, t.numel, sample, exact)
        offsets, pos = inp.states[i].offsets, 0
        for key in t.keys:
            offsets[key] = pos
            pos += inp.base.meta(key).numel
        if band.needs_passes:
            for j, key in enumerate(t.keys):
                pos = offsets[key]
                for x in inp.term_slices(i, key, base):
                    band.add(x.abs_().to(torch.float32), pos)
                    pos += x.numel()
                progress(f"top-k {i + 1}/{len(inp.states)}", j + 1, len(t.keys))
        rule = band.result()
        piece = band.tie_piece(rule) if rule is not None else None
        if piece is not None:  # where the kept ties at the threshold end (`GlobalTopK.at`)
            rule.cut = _tie_cut(inp, i, rule, *piece, base)
        if rule is None:  # the sample misled: exact histogram passes
            kth = KthLargest(k, t.numel)
            for add in (kth.add_pass1, kth.add_pass2):
                for key in t.keys:
                    for x in inp.term_slices(i, key, base):
                        add(x.abs_().to(torch.float32))
                if add == kth.add_pass1:
                    kth.end_pass1()
            rule = kth.result()
        inp.states[i].topk = rule
    finally:
        if base is not None:
            base.close()


def _tie_cut(inp: MergeInputs, i: int, rule, offset: int, ties: int, base) -> int:
    """The vector position just past the `ties`-th entry equal to the rule's value in term i's
    slice that starts at vector position `offset` (read again: one slice)."""
    t, offsets = inp.plan.terms[i], inp.states[i].offsets
    key = next(k for k in t.keys if 0 <= offset - offsets[k] < inp.base.meta(k).numel)
    lo = offset - offsets[key]
    for j, x in enumerate(inp.term_slices(i, key, base)):
        if j * inp.chunk == lo:
            return offset + ties_cut(x, GlobalTopK(value=rule.value, ties=ties))
    raise AssertionError(f"no slice of {key!r} starts at {lo}")  # pragma: no cover


def band_thresholds(inp: MergeInputs, density: float, progress: Progress) -> None:
    """Every term's global top-k rule, terms spread over `workers()` threads."""
    n = len(inp.plan.terms)
    if inp.workers == 1 or n == 1:
        for i in range(n):
            _threshold(inp, i, density, progress)
        return
    with ThreadPoolExecutor(inp.workers, thread_name_prefix="tvtool-topk") as pool:
        for f in [pool.submit(_threshold, inp, i, density, progress) for i in range(n)]:
            f.result()


def _buffer(held: list, j: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first n elements of buffer j % 2 of `held` (grown as needed)."""
    buf = held[j % 2]
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = held[j % 2] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _term_hashes(inp: MergeInputs, key: str, ids: list[int], raws, cdt) -> list:
    """Per stacked row: the sha256 to feed with the term's raw bytes of `key` (a checkpoint
    term hashed while streaming, its bytes read straight into the row), else None."""
    out = []
    for i in ids:
        d, raw = inp.term_digests[i], raws[i] if i < len(raws) else None
        out.append(d.new(key) if d is not None and raw is not None and raw.dtype(key) == cdt
                   else None)
    return out


def stacked_pieces(
    inp: MergeInputs, key: str, ids: list[int], n: int, base_hash: hashlib._Hash | None
) -> Iterator[torch.Tensor]:
    """The output of a touched key, slice by slice, for a `stacked` method (see the module):
    slice j + 1 is read (and the base's bytes hashed) on the reader thread while slice j is
    computed, into the other of two buffer sets. Checkpoint terms hashed while streaming
    (`merge_digests`): the reader thread hashes the first half of them, this thread the rest."""
    cdt = inp.cdtype(key)
    meta = inp.base.meta(key)
    info = TensorInfo(key, tuple(meta.shape))
    rules, cuts = _resolved(inp, key, ids, meta.numel)
    weights = [inp.states[i].weight for i in ids]
    ckpt = any(inp.is_ckpt[i] for i in ids)
    direct = cdt == torch.float32 or not ckpt  # else: float32 differences, as `extract`
    hs = _term_hashes(inp, key, ids, inp.vec_slices, cdt) if direct else [None] * len(ids)
    hashed = [r for r, h in enumerate(hs) if h is not None]
    mine = hashed[: (len(hashed) + 1) // 2] if inp.reader_pool is not None else hashed
    later = [r for r in hashed if r not in mine]
    step = span(len(ids), inp.chunk)
    bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def load(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = bounds[j]
        b = inp.slices.read_into(key, lo, hi, inp.ring.slot(hi - lo, meta.dtype))
        feed(base_hash, b)
        x = _buffer(inp.stack_bufs, j, len(ids) * (hi - lo), cdt).view(len(ids), hi - lo)
        for r, i in enumerate(ids):
            if direct:
                inp.vec_slices[i].read_into(key, lo, hi, x[r])
            else:
                x[r].copy_(inp.term_slice(i, key, lo, hi, inp.slices))
        for r in mine:
            feed(hs[r], x[r])
        return b, x

    pool = inp.reader_pool
    if pool is not None and base_hash is None and not hashed and (direct or not ckpt) and all(
        inp.vec_slices[i].dtype(key) == cdt for i in ids
    ) and not any(r is not None and r.ordered and c is None for r, c in zip(rules, cuts,
                                                                            strict=True)):
        yield from _parallel_slices(inp, key, ids, bounds, rules, cuts, weights, cdt, info)
        return
    ahead: Future | None = None
    for j in range(len(bounds)):
        if pool is None:
            b, x = load(j)
        else:
            b, x = (ahead or pool.submit(load, j)).result()
            ahead = pool.submit(load, j + 1) if j + 1 < len(bounds) else None
        for r in later:
            feed(hs[r], x[r])
        if ckpt and direct:
            b32 = b if b.dtype == torch.float32 else b.to(torch.float32)
            for r, i in enumerate(ids):
                if inp.is_ckpt[i]:
                    x[r].sub_(b32)
        acc = b.to(cdt)
        sliced = _sliced(rules, cuts, *bounds[j])
        yield inp.m.combine_rows(acc, x, sliced, weights, inp.plan.scale, inp.p, info)


def _resolved(inp: MergeInputs, key: str, ids: list[int], n: int) -> tuple[list, list]:
    """The terms' global rules for `key` (n entries) and where in it their kept ties stop
    (`GlobalTopK.at`; None everywhere without global rules)."""
    rules, cuts = [], []
    for i in ids:
        st = inp.states[i]
        rule, cut = st.topk.at(st.offsets[key], n) if st.topk and key in st.offsets else (
            st.topk, None)
        rules.append(rule)
        cuts.append(cut)
    return rules, cuts


def _sliced(rules: list, cuts: list, lo: int, hi: int) -> list:
    """`rules` for the columns [lo, hi) of their key (`topk.slice_rule` where ties stop)."""
    if all(c is None for c in cuts):
        return rules
    return [slice_rule(r, c, lo, hi) for r, c in zip(rules, cuts, strict=True)]


def _parallel_slices(inp: MergeInputs, key: str, ids: list[int], bounds, rules, cuts, weights,
                     cdt: torch.dtype, info: TensorInfo) -> Iterator[torch.Tensor]:
    """`stacked_pieces` when nothing is hashed, every read goes straight into its buffer and no
    rule takes ties in order without knowing where they stop (`GlobalTopK.cut`): each slice
    read *and* merged on one of `reader_pool`'s threads,
    two slices in flight (both cores compute; the output slots are taken here, in order)."""
    meta = inp.base.meta(key)
    ckpt = [r for r, i in enumerate(ids) if inp.is_ckpt[i]]

    def work(j: int, out: torch.Tensor) -> torch.Tensor:
        lo, hi = bounds[j]
        b = inp.slices.read_into(key, lo, hi, out)
        x = _buffer(inp.stack_bufs, j, len(ids) * (hi - lo), cdt).view(len(ids), hi - lo)
        for r, i in enumerate(ids):
            inp.vec_slices[i].read_into(key, lo, hi, x[r])
        if ckpt:
            b32 = b if b.dtype == torch.float32 else b.to(torch.float32)
            for r in ckpt:
                x[r].sub_(b32)
        return inp.m.combine_rows(b.to(cdt), x, _sliced(rules, cuts, lo, hi), weights,
                                  inp.plan.scale, inp.p, info)

    flight: deque[Future] = deque()
    for j in range(len(bounds)):
        lo, hi = bounds[j]
        flight.append(inp.reader_pool.submit(work, j, inp.ring.slot(hi - lo, meta.dtype)))
        if len(flight) == 2:
            yield flight.popleft().result()
    while flight:
        yield flight.popleft().result()


_scratch = threading.local()
ROW_PIECE = 1 << 17  # elements read, subtracted and taken |.| of at a time (cache-sized)


def _abs_buffer(n: int) -> torch.Tensor:
    """This thread's reused float32 buffer of n elements (the magnitudes of one row)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]


def whole_rows(
    inp: MergeInputs,
    key: str,
    ids: list[int],
    n: int,
    base_hash: hashlib._Hash | None,
    acc: torch.Tensor | None = None,
    base32: torch.Tensor | None = None,
) -> torch.Tensor:
    """A `stacked` method on whole tensors (per-tensor top-k): the terms stacked [T, n] in one
    reused buffer, each row read straight into it by positioned reads in cache-sized pieces
    (each hashed there when streamed hashing is on, minus the base for a checkpoint, and its
    magnitude taken while hot), then its trim rule (the global one, or this tensor's top-k by
    an in-place selection of the magnitudes, `topk.partition_rule`; where only some ties at the
    threshold are kept, the index where they stop, `topk.ties_cut`), rows spread over
    `inp.pool`; then `combine_rows` over cache-sized column slices, the two column halves in
    parallel (each slice gets its rows' rules for its columns, `topk.slice_rule`; global rules
    that keep only some ties take them in index order: one thread). `acc`/`base32`: the base
    as read by a torch-format reader (then every row comes from `_tau`)."""
    cdt = inp.cdtype(key)
    info = TensorInfo(key, tuple(inp.base.meta(key).shape))
    if acc is None:
        b = inp.ring.slot(n, inp.base.meta(key).dtype)
        if base_hash is None:  # the two halves read in parallel
            _run(inp, lambda h: inp.rows_base.read_into(key, h[0], h[1], b[h[0]:h[1]]),
                 [(0, n // 2), (n // 2, n)] if n >= 2 * ROW_PIECE else [(0, n)])
        else:
            feed(base_hash, inp.rows_base.read_into(key, 0, n, b))
        ckpt = any(inp.is_ckpt[i] for i in ids)
        base32 = b if b.dtype == torch.float32 or not ckpt else b.to(torch.float32)
        acc = b.to(cdt)
    x = _buffer(inp.stack_bufs, 0, len(ids) * n, cdt).view(len(ids), n)
    hs = _term_hashes(inp, key, ids, inp.rows_vecs, cdt)
    density = inp.m.density(inp.p)
    k = topk_count(n, density) if density is not None else 0
    rules, cuts = _resolved(inp, key, ids, n)

    def row(r: int) -> None:
        i = ids[r]
        raw = inp.rows_vecs[i] if i < len(inp.rows_vecs) else None
        mags = density is not None and cdt == torch.float32
        a = _abs_buffer(n) if mags else None
        if raw is not None and (raw.dtype(key) == cdt or not inp.is_ckpt[i]):
            for lo in range(0, n, ROW_PIECE):
                hi = min(n, lo + ROW_PIECE)
                piece = x[r, lo:hi]
                raw.read_into(key, lo, hi, piece)
                feed(hs[r], piece)
                if inp.is_ckpt[i]:
                    piece.sub_(base32[lo:hi])
                if mags:
                    torch.abs(piece, out=a[lo:hi])
        else:
            x[r].copy_(inp._tau(i, key, base32))
            if mags:
                torch.abs(x[r], out=a)
        if density is not None:
            rule = rules[r] = topk_rule(a if mags else _abs32(x[r]), k, scratch=True)
            if rule.ordered and cdt == torch.float32:
                cuts[r] = ties_cut(x[r], rule)

    _run(inp, row, range(len(ids)))
    if inp.m.global_density(inp.p) is None and density is None:
        rules = None
    weights = [inp.states[i].weight for i in ids]
    step = span(len(ids), inp.chunk)
    bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def columns(part: list[tuple[int, int]]) -> None:
        for lo, hi in part:
            sliced = _sliced(rules, cuts, lo, hi) if rules is not None else None
            inp.m.combine_rows(acc[lo:hi], x[:, lo:hi], sliced, weights, inp.plan.scale, inp.p,
                               info)

    ordered = rules is not None and any(
        r is not None and r.ordered and c is None for r, c in zip(rules, cuts, strict=True))
    half = (len(bounds) + 1) // 2
    parts = [bounds] if ordered or inp.pool is None else [bounds[:half], bounds[half:]]
    _run(inp, columns, parts)
    return acc


def _abs32(row: torch.Tensor) -> torch.Tensor:
    """|row| as float32, in this thread's reused scratch buffer."""
    buf = _abs_buffer(row.numel())
    return torch.abs(row, out=buf) if row.dtype == torch.float32 else buf.copy_(row).abs_()


def _run(inp: MergeInputs, fn, items) -> None:
    """fn over items, on `inp.pool` when there is one (errors raised here)."""
    items = list(items)
    if inp.pool is None or len(items) < 2:
        for it in items:
            fn(it)
        return
    for f in [inp.pool.submit(fn, it) for it in items]:
        f.result()
