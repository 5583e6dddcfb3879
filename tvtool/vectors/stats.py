"""Statistics of task vectors, computed in one streaming pass over the tensor names.

For every key, the tensors of that key from all T vectors are read and reduced (by two worker
threads, slice by slice: at most two keys' slices in memory, never T vectors; see vectors.gram)
into per-block statistics, the Gram matrix of dot products (whence the
pairwise cosine similarities), sign-agreement counts and, optionally, the contribution
`||Lambda[t, i] * tau_t,i||` of each vector to each block of a `coefs` object.

Keys that only factored (LoRA) vectors hold skip the dense tensors: norms and cosines come from
the factors, the entrywise statistics from tiles (`factored_stats`).

A vector that lacks a key counts as zero there: cosines are those of the vectors in the full
parameter space. Two vectors holding one key with different shapes are an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel

from tvtool.checkpoints.readers import CheckpointReader
from tvtool.errors import TvtoolError
from tvtool.store.store import Store
from tvtool.vectors.blocks import CoefsLayout, coef_for_key
from tvtool.vectors.factored_stats import factored_key_sums, factors_of
from tvtool.vectors.gram import KeyRows, KeySums, range_reader, stream_keys


class BlockStats(BaseModel):
    name: str
    numel: int
    l2: float
    rms: float
    max_abs: float
    frac_zero: float


class VectorStats(BaseModel):
    name: str
    digest: str
    numel: int
    l2: float
    rms: float
    max_abs: float
    frac_zero: float
    blocks: list[BlockStats]


class NamedMatrix(BaseModel):
    names: list[str]
    matrix: list[list[float | None]]


class BlockCosine(BaseModel):
    name: str
    cosine: list[float | None]  # one per pair, in `PerBlockCosine.pairs` order


class PerBlockCosine(BaseModel):
    pairs: list[tuple[str, str]]
    blocks: list[BlockCosine]


class CoefsBlock(BaseModel):
    name: str
    groups: int
    coef: list[float]  # per vector: the coefficient (mean over groups when partitioned)
    coef_min: list[float]
    coef_max: list[float]
    contribution: list[float]  # per vector: ||Lambda[t, i] * tau_t,i||
    top: str  # the vector contributing most to this block
    top_share: float  # its contribution / the sum of contributions


class CoefsTable(BaseModel):
    name: str
    digest: str
    granularity: str
    partitions: int
    vectors: list[str]
    blocks: list[CoefsBlock]
    top_counts: dict[str, int]  # vector -> blocks where it contributes most


class InspectReport(BaseModel):
    vectors: list[VectorStats]
    cosine: NamedMatrix
    sign_agreement: NamedMatrix
    per_block_cosine: PerBlockCosine | None = None
    coefs: CoefsTable | None = None


@dataclass
class Source:
    """One vector to inspect: a display name, its digest and an open reader."""

    name: str
    digest: str
    reader: CheckpointReader


@dataclass
class CoefsInput:
    name: str
    digest: str
    coefs: torch.Tensor  # [T, G]
    layout: CoefsLayout
    rows: list[int | None]  # layout row t -> index into the sources (None: not available)


@dataclass
class _Acc:
    numel: int = 0
    sumsq: float = 0.0
    max_abs: float = 0.0
    zeros: int = 0


def _block(name: str, a: _Acc) -> BlockStats:
    l2 = math.sqrt(a.sumsq)
    return BlockStats(
        name=name, numel=a.numel, l2=l2, rms=l2 / math.sqrt(a.numel) if a.numel else 0.0,
        max_abs=a.max_abs, frac_zero=a.zeros / a.numel if a.numel else 0.0,
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else None


def inspect_vectors(
    sources: list[Source],
    *,
    per_block: bool = False,
    coefs: CoefsInput | None = None,
    on_key: Callable[[str], None] | None = None,
) -> tuple[InspectReport, list[str]]:
    """Statistics of `sources` in one pass; returns the report and the keys in read order."""
    t = len(sources)
    if t == 0:
        raise TvtoolError("nothing to inspect: give at least one vector")
    keys = sorted({k for s in sources for k in s.reader.keys()})
    blocks: list[dict[str, _Acc]] = [{} for _ in range(t)]
    dots = torch.zeros(t, t, dtype=torch.float64)
    agree = torch.zeros(t, t, dtype=torch.float64)  # (#same sign - #opposite sign)
    both = torch.zeros(t, t, dtype=torch.float64)  # both nonzero
    pairs = [(i, j) for i in range(t) for j in range(i + 1, t)]
    block_cos: list[BlockCosine] = []
    contrib = _ContributionAcc(coefs) if coefs else None

    def holders_of(key: str) -> list[int]:
        return [i for i, s in enumerate(sources) if key in s.reader]

    # keys only factored vectors hold: norms and cosines from the factors (`factored_stats`)
    factored = [] if contrib is not None else [
        k for k in keys if all(k in getattr(sources[i].reader, "factors", {})
                               for i in holders_of(k))]
    fset = set(factored)
    stream = stream_keys(
        [k for k in keys if k not in fset],
        holders_of,
        lambda i, key: sources[i].reader.get(key),
        lambda i, key: tuple(sources[i].reader.meta(key).shape),
        [s.name for s in sources],
        keep_rows=contrib is not None,
        ranged=lambda i, key: range_reader(sources[i].reader, key),
    )

    def absorb(rows: KeyRows, sums: KeySums) -> None:
        key, holders, n = rows.key, rows.holders, rows.numel
        g = sums.gram
        idx = torch.tensor(holders)
        dots[idx[:, None], idx[None, :]] += g
        agree[idx[:, None], idx[None, :]] += sums.agree
        both[idx[:, None], idx[None, :]] += sums.both
        for r, i in enumerate(holders):
            zeros = n - int(sums.nonzero[r])  # type: ignore[index]
            blocks[i][key] = _Acc(n, float(g[r, r]), rows.max_abs[r], zeros)
        if per_block and pairs:
            pos = {i: r for r, i in enumerate(holders)}
            cos = []
            for i, j in pairs:
                if i in pos and j in pos:
                    ri, rj = pos[i], pos[j]
                    cos.append(_ratio(float(g[ri, rj]), math.sqrt(float(g[ri, ri] * g[rj, rj]))))
                else:
                    cos.append(None)
            block_cos.append(BlockCosine(name=key, cosine=cos))
        if contrib is not None:
            contrib.add(key, rows.shape, rows.rows, holders)  # type: ignore[arg-type]
        if on_key:
            on_key(key)

    for rows in stream:
        absorb(rows, rows.sums)
        del rows
    readers = [s.reader for s in sources]
    for key in factored:
        holders = holders_of(key)
        parts = factors_of(readers, key, holders)
        if parts is None:  # mixed transposes or factor shapes: expand one tensor at a time
            for rows in stream_keys([key], holders_of, lambda i, k: readers[i].get(k),
                                    lambda i, k: tuple(readers[i].meta(k).shape),
                                    [s.name for s in sources]):
                absorb(rows, rows.sums)
        else:
            shape = tuple(readers[holders[0]].meta(key).shape)
            absorb(*factored_key_sums(key, shape, holders, parts))
    if factored:  # blocks in name order, as read
        blocks = [dict(sorted(bl.items())) for bl in blocks]
        block_cos.sort(key=lambda b: b.name)

    vectors = []
    for s, bl in zip(sources, blocks, strict=True):
        total = _Acc()
        for a in bl.values():
            total.numel += a.numel
            total.sumsq += a.sumsq
            total.max_abs = max(total.max_abs, a.max_abs)
            total.zeros += a.zeros
        whole = _block("all", total)
        vectors.append(VectorStats(
            name=s.name, digest=s.digest, numel=whole.numel, l2=whole.l2, rms=whole.rms,
            max_abs=whole.max_abs, frac_zero=whole.frac_zero,
            blocks=[_block(k, a) for k, a in bl.items()],
        ))
    names = [s.name for s in sources]
    norms = dots.diagonal().sqrt()
    cosine = [[_ratio(float(dots[i, j]), float(norms[i] * norms[j])) for j in range(t)]
              for i in range(t)]
    signs = [[_ratio(float(agree[i, j] + both[i, j]) / 2, float(both[i, j])) if t > 1 else None
              for j in range(t)] for i in range(t)]
    if t == 1:  # a lone vector agrees with itself wherever it is nonzero
        signs = [[1.0 if vectors[0].frac_zero < 1 else None]]
    report = InspectReport(
        vectors=vectors,
        cosine=NamedMatrix(names=names, matrix=cosine),
        sign_agreement=NamedMatrix(names=names, matrix=signs),
        per_block_cosine=PerBlockCosine(
            pairs=[(names[i], names[j]) for i, j in pairs], blocks=block_cos
        ) if per_block else None,
        coefs=contrib.table(names) if contrib is not None else None,
    )
    return report, keys


class _ContributionAcc:
    """Accumulates ||Lambda[t, i] * tau_t,i||^2 per (layout row, block) while streaming."""

    def __init__(self, coefs: CoefsInput):
        self.c = coefs
        self.index = coefs.layout.key_index()
        self.sq = torch.zeros(len(coefs.layout.vectors), len(coefs.layout.blocks),
                              dtype=torch.float64)
        self.rows_of = {}
        for row, src in enumerate(coefs.rows):
            if src is not None:
                self.rows_of.setdefault(src, []).append(row)

    def add(
        self, key: str, shape: tuple[int, ...], x: list[torch.Tensor], holders: list[int]
    ) -> None:
        if key not in self.index:
            return
        b, _ = self.index[key]
        for r, i in enumerate(holders):
            for row in self.rows_of.get(i, []):
                c = coef_for_key(self.c.coefs[row].to(torch.float64), key, shape, self.c.layout,
                                 self.index)
                if c.dim() == 0:
                    self.sq[row, b] += float(c) ** 2 * float(x[r].double().square().sum())
                else:
                    self.sq[row, b] += float((c.reshape(-1) * x[r].double()).square().sum())

    def table(self, source_names: list[str]) -> CoefsTable:
        lay, coefs = self.c.layout, self.c.coefs.to(torch.float64)
        vec_names = [source_names[s] if s is not None else d[:12]
                     for s, d in zip(self.c.rows, lay.vectors, strict=True)]
        out, counts = [], dict.fromkeys(vec_names, 0)
        for bi, (blk, off) in enumerate(zip(lay.blocks, lay.offsets(), strict=True)):
            cols = coefs[:, off:off + blk.groups]
            contribution = self.sq[:, bi].sqrt().tolist()
            total = sum(contribution)
            if total > 0:
                top = max(range(len(vec_names)), key=lambda r: contribution[r])
            else:
                top = int(cols.abs().mean(dim=1).argmax())
            counts[vec_names[top]] += 1
            out.append(CoefsBlock(
                name=blk.name, groups=blk.groups,
                coef=cols.mean(dim=1).tolist(), coef_min=cols.amin(dim=1).tolist(),
                coef_max=cols.amax(dim=1).tolist(), contribution=contribution,
                top=vec_names[top], top_share=contribution[top] / total if total > 0 else 0.0,
            ))
        return CoefsTable(
            name=self.c.name, digest=self.c.digest, granularity=lay.granularity,
            partitions=lay.partitions, vectors=vec_names, blocks=out, top_counts=counts,
        )


def inspect_store(
    store: Store,
    names: list[str],
    *,
    per_block: bool = False,
    coefs_ref: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_key: Callable[[str], None] | None = None,
) -> InspectReport:
    """Resolve and inspect stored vectors. With `coefs_ref`, the vectors its layout refers to
    are inspected too (when not given already), to weigh each coefficient by its block's norm."""
    from tvtool.vectors.stored import load_coefs, open_tensor_object

    digests = [store.resolve(n, kind="vector") for n in names]
    shown = [
        n if store.get_ref(n) == d else store.display_name(d)
        for n, d in zip(names, digests, strict=True)
    ]
    coefs_input = None
    if coefs_ref is not None:
        manifest, table, layout = load_coefs(store, coefs_ref)
        rows: list[int | None] = []
        for d in layout.vectors:
            if d not in digests:
                if not store.has(d):
                    raise TvtoolError(
                        f"{coefs_ref!r} refers to vector {d[:12]}, which is not in the store"
                    )
                digests.append(d)
                shown.append(store.display_name(d))
            rows.append(digests.index(d))
        coefs_input = CoefsInput(
            name=coefs_ref if store.get_ref(coefs_ref) == manifest.digest
            else manifest.digest[:12],
            digest=manifest.digest, coefs=table, layout=layout, rows=rows,
        )
    readers = []
    try:
        for d in digests:
            readers.append(open_tensor_object(store, d, "vector")[1])
        sources = [Source(n, d, r) for n, d, r in zip(shown, digests, readers, strict=True)]
        if on_start:
            on_start(len({k for r in readers for k in r.keys()}))
        report, _ = inspect_vectors(sources, per_block=per_block, coefs=coefs_input, on_key=on_key)
    finally:
        for r in readers:
            r.close()
    return report
