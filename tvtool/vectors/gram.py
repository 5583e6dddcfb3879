"""One streamed pass over the keys of several tensor files: per key, the rows of all holders and
their pairwise sums (Gram matrix, sign agreement), for `inspect` and `select --score norm`.

A background thread reads key k+1 (positioned reads release the GIL) while the caller reduces
key k, so reading and arithmetic use both cores; at most two keys' tensors are in memory
(O(largest tensor x vectors)). Each key's rows are copied into column chunks of `CHUNK`
elements, every chunk one contiguous [rows, w] block: the products then run on cache-sized,
contiguous operands and each element comes from memory once.

Precision: every chunk's products are float32 matrix products (exact for the sign sums, which
are integers below 2^24), summed over chunks in float64; norms and cosines are accurate to about
1e-6 relative, far below anything they are used for, at a fraction of the cost of a float64
product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tvtool.errors import TvtoolError

CHUNK = 1 << 14  # columns per chunk: 8 rows x 16384 x 4 bytes = 512 KB, in the L2 cache


@dataclass
class KeyRows:
    """Key `key` of every vector that holds it (`holders`: indices into the sources)."""

    key: str
    shape: tuple[int, ...]
    holders: list[int]
    chunks: list[torch.Tensor]  # float32 [len(holders), w] each, covering the columns in order
    max_abs: list[float]  # per holder
    rows: list[torch.Tensor] | None  # the holders' tensors as read (keep_rows=True)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class KeySums:
    gram: torch.Tensor  # [r, r] float64: dot products
    agree: torch.Tensor | None  # [r, r] float64: #same sign - #opposite sign (with signs)
    both: torch.Tensor | None  # [r, r] float64: #both nonzero (with signs)
    nonzero: torch.Tensor | None  # [r] float64: #nonzero per row (with signs)


Reader = Callable[[int, str], torch.Tensor]  # (source index, key) -> tensor
Meta = Callable[[int, str], tuple[int, ...]]  # (source index, key) -> shape


def _read_key(
    key: str, holders: list[int], get: Reader, shape_of: Meta, names: Sequence[str],
    keep_rows: bool,
) -> KeyRows:
    shapes = [tuple(shape_of(i, key)) for i in holders]
    if len(set(shapes)) > 1:
        shown = ", ".join(f"{names[i]}: {list(s)}" for i, s in zip(holders, shapes, strict=False))
        raise TvtoolError(f"tensor {key!r} has different shapes across vectors ({shown})")
    shape = shapes[0]
    n, r = math.prod(shape), len(holders)
    full = n // CHUNK
    body = torch.empty(full, r, CHUNK, dtype=torch.float32)
    tail = torch.empty(r, n - full * CHUNK, dtype=torch.float32)
    max_abs, rows = [], [] if keep_rows else None
    for j, i in enumerate(holders):
        t = get(i, key).reshape(-1)
        if t.numel():
            lo, hi = torch.aminmax(t)
            max_abs.append(max(abs(float(lo)), abs(float(hi))))
        else:
            max_abs.append(0.0)
        body[:, j, :] = t[: full * CHUNK].view(full, CHUNK)
        tail[j] = t[full * CHUNK :]
        if rows is not None:
            rows.append(t)
        del t
    chunks = list(body.unbind(0)) + ([tail] if tail.shape[1] else [])
    return KeyRows(key, shape, holders, chunks, max_abs, rows)


def stream_keys(
    keys: Sequence[str],
    holders_of: Callable[[str], list[int]],
    get: Reader,
    shape_of: Meta,
    names: Sequence[str],
    keep_rows: bool = False,
) -> Iterator[KeyRows]:
    """KeyRows of every key in order, the next key read in a background thread."""
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvtool-read") as pool:

        def submit(key: str):
            return pool.submit(_read_key, key, holders_of(key), get, shape_of, names, keep_rows)

        pending = submit(keys[0])
        for nxt in list(keys[1:]) + [None]:
            current = pending.result()
            pending = submit(nxt) if nxt is not None else None
            yield current
            del current


def key_sums(rows: KeyRows, signs: bool) -> KeySums:
    """Gram matrix and (with signs) sign agreement sums of one key's rows."""
    r = len(rows.holders)
    gram = torch.zeros(r, r, dtype=torch.float64)
    agree = torch.zeros(r, r, dtype=torch.float64) if signs else None
    both = torch.zeros(r, r, dtype=torch.float64) if signs else None
    nonzero = torch.zeros(r, dtype=torch.float64) if signs else None
    scratch = torch.empty(r, CHUNK, dtype=torch.float32) if signs else None
    for c in rows.chunks:
        gram += c @ c.T
        if signs:
            w = c.shape[1]
            s = torch.sign(c, out=scratch[:, :w])  # type: ignore[index]
            a = s @ s.T  # integers below 2^24: exact
            agree += a  # type: ignore[operator]
            nz = a.diagonal()
            nonzero += nz  # type: ignore[operator]
            if bool((nz < w).any()):  # zeros here: count the pairs where both are nonzero
                s.abs_()
                both += s @ s.T  # type: ignore[operator]
            else:
                both += w  # type: ignore[operator]
    return KeySums(gram, agree, both, nonzero)
