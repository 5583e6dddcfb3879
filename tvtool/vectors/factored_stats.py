"""`inspect` statistics of a key that only factored (LoRA) vectors hold, without its dense tensors.

Holder t stands for ``tau_t = s_t B_t A_t`` (``B`` [m, r_t], ``A`` [r_t, n]; transposed or not,
the same for every holder). Inner products come from the factors, exactly, in float64:

    <tau_i, tau_j> = s_i s_j tr((B_i^T B_j) (A_j A_i^T))    (r_i x r_j products only)
    ||tau_i||^2    = s_i^2 sum((B_i^T B_i) * (A_i A_i^T))

so the Gram matrix (norms, cosines) costs O(r^2 (m + n)). The entrywise statistics (max|x|,
zeros, sign agreement) need entries: they are computed on tiles of at most `gram.CHUNK`
elements, ``s_t B_t[rows] @ A_t[:, cols]`` for all holders at once, so the dense tensors never
exist (memory: the factors plus one tile per holder). Keys held by dense and factored vectors
alike take the dense path (`FactoredReader.get` expands one tensor at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from tvtool.vectors.gram import CHUNK, KeyRows, KeySums, tile_sums

Factor = tuple[torch.Tensor, torch.Tensor, float, bool]  # (A, B, scale, transpose)


def factored_gram(factors: list[Factor]) -> torch.Tensor:
    """[T, T] float64 inner products of the dense ``s B A`` from the factors alone."""
    a = [f[0].double() for f in factors]
    b = [f[1].double() for f in factors]
    s = [f[2] for f in factors]
    t = len(factors)
    g = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(i, t):
            v = s[i] * s[j] * float(((b[i].T @ b[j]) * (a[i] @ a[j].T)).sum())
            g[i, j] = g[j, i] = v
    return g


def _tiles(factors: list[Factor]) -> Iterator[torch.Tensor]:
    """[T, w] float32 tiles covering every entry of the dense tensors (same order for all)."""
    m, n = factors[0][1].shape[0], factors[0][0].shape[1]
    cols = min(n, CHUNK)
    rows = max(1, CHUNK // cols)
    a32 = [f[0].to(torch.float32) for f in factors]
    b32 = [f[1].to(torch.float32) * f[2] for f in factors]
    for r0 in range(0, m, rows):
        for c0 in range(0, n, cols):
            yield torch.stack([(b[r0:r0 + rows] @ a[:, c0:c0 + cols]).reshape(-1)
                               for a, b in zip(a32, b32, strict=True)])


def factored_key_sums(key: str, shape: tuple[int, ...], holders: list[int],
                      factors: list[Factor]) -> tuple[KeyRows, KeySums]:
    """`gram`'s sums of one key (and its KeyRows) from its holders' factors."""
    sums, max_abs, nonzero = tile_sums(_tiles(factors), len(holders))  # entrywise, over tiles
    sums.gram = factored_gram(factors)  # exact, from the factors
    return KeyRows(key, shape, holders, sums, max_abs, nonzero, None), sums


def factors_of(readers: list, key: str, holders: list[int]) -> list[Factor] | None:
    """The holders' factors of `key` when every holder is factored there, with one transpose
    flag and matching factor shapes; None otherwise (the key takes the dense path)."""
    out = []
    for i in holders:
        part = getattr(readers[i], "factor", lambda _k: None)(key)
        if part is None:
            return None
        out.append(part)
    if len({f[3] for f in out}) > 1 or len({(f[1].shape[0], f[0].shape[1]) for f in out}) > 1:
        return None
    m, n = out[0][1].shape[0], out[0][0].shape[1]
    shape = tuple(readers[holders[0]].meta(key).shape)
    if math.prod(shape) != m * n:  # pragma: no cover - the manifest records the product's shape
        return None
    return out
