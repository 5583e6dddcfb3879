"""The streaming side of `merge`: open inputs, run the per-term pipeline, yield output bytes.

A term's tensor is a stored vector's, or `ft - base` (float32, as `extract` computes it) for a
checkpoint term, read in the same pass. Two granularities, identical results:

* slices (the fast path): when the base is safetensors and no step needs a whole tensor, every
  key is processed in flat slices of `CHUNK` elements read with positioned reads, so the base,
  the T vector slices and the result all stay in CPU cache (measured: ~2x faster than whole
  tensors for sum on a ViT-B/32-sized model).
* whole tensors: methods whose maths is not elementwise (`Method.whole_tensor`: random streams,
  per-tensor top-k, norms) and torch-format inputs load each key's tensors whole.

Peak memory is one tensor times the number of vectors either way (the global top-k pre-pass
reads one tensor at a time). Slices are read by `slice_reader.SliceReader`, output buffers come
from `merge_buffers.Ring`; the stacked methods' paths are in `merge_rows`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch

from tvtool.checkpoints.keymaps import align_vector
from tvtool.checkpoints.readers import CheckpointReader, SafetensorsReader, open_checkpoint
from tvtool.checkpoints.writer import TensorSpec
from tvtool.store.store import Store
from tvtool.vectors import stored
from tvtool.vectors.blocks import CoefsLayout, coef_for_key
from tvtool.vectors.merge_buffers import Ring
from tvtool.vectors.merge_digests import StreamDigests, feed
from tvtool.vectors.merge_plan import MergePlan
from tvtool.vectors.merge_rows import band_thresholds, stacked_pieces, whole_rows, workers
from tvtool.vectors.methods.base import TensorInfo, TermState
from tvtool.vectors.methods.topk import KthLargest, topk_count
from tvtool.vectors.slice_reader import CHUNK, SliceReader
from tvtool.vectors.stored import open_tensor_object

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class MergeInputs:
    """The open inputs of one merge (from a `MergePlan`) and the per-key pipeline."""

    def __init__(self, stack: ExitStack, store: Store, plan: MergePlan):
        self.plan, self.p, self.m = plan, plan.params, plan.method
        self.base = stack.enter_context(open_checkpoint(plan.request.base))
        self.vecs: list[CheckpointReader] = []
        for t in plan.terms:
            if t.checkpoint is not None:
                self.vecs.append(stack.enter_context(open_checkpoint(t.checkpoint)))
            else:
                vec = stack.enter_context(open_tensor_object(store, t.digest)[1])
                self.vecs.append(align_vector(vec, set(self.base.keys())))  # HF layouts
        self.is_ckpt = [t.checkpoint is not None for t in plan.terms]
        self.masks = [
            stack.enter_context(open_tensor_object(store, t.mask, "mask")[1]) if t.mask else None
            for t in plan.terms
        ]
        self.states = [TermState(vector=t.identity, weight=t.weight) for t in plan.terms]
        self.coefs: torch.Tensor | None = None
        self.layout: CoefsLayout | None = None
        if plan.coefs:
            _, self.coefs, self.layout = stored.load_coefs(store, plan.coefs)
        self.key_index = self.layout.key_index() if self.layout else None
        self.slices: SliceReader | None = None
        self.vec_slices: list[SliceReader | None] = []
        if not self.m.whole_tensor(self.p):
            self.slices = SliceReader.of(self.base, stored=False)
        if self.slices is not None:
            stack.callback(self.slices.close)
            for v, ckpt in zip(self.vecs, self.is_ckpt, strict=True):
                self.vec_slices.append(SliceReader.of(v, stored=not ckpt))
            self.mask_slices = [SliceReader(list(m.files)) if m else None for m in self.masks]
            for r in [*self.vec_slices, *self.mask_slices]:
                if r is not None:
                    stack.callback(r.close)
            if any(r is None for r in self.vec_slices):  # a torch-format checkpoint term
                self.slices.close()
                self.slices = None
        self.rows_base: SliceReader | None = None  # whole `stacked` tensors: positioned reads
        self.rows_vecs: list[SliceReader | None] = []
        if self.slices is None and self.m.stacked(self.p):
            self.rows_base = SliceReader.of(self.base, stored=False)
            if self.rows_base is not None:
                stack.callback(self.rows_base.close)
                for v, ckpt in zip(self.vecs, self.is_ckpt, strict=True):
                    r = SliceReader.of(v, stored=not ckpt)
                    self.rows_vecs.append(r)
                    if r is not None:
                        stack.callback(r.close)
        self.chunk = CHUNK
        self.stacked = self.m.stacked(self.p)
        self.ring = Ring()  # output slices (base dtype), written behind
        self.stack_bufs: list[torch.Tensor | None] = [None, None]
        self.workers = workers()
        self.reader_pool: ThreadPoolExecutor | None = None
        if self.slices is not None and self.stacked and self.workers > 1:
            self.reader_pool = stack.enter_context(
                ThreadPoolExecutor(self.workers, thread_name_prefix="tvtool-read")
            )
        self.pool: ThreadPoolExecutor | None = None  # whole `stacked` tensors: rows in parallel
        if self.rows_base is not None and self.workers > 1:
            self.pool = stack.enter_context(
                ThreadPoolExecutor(self.workers, thread_name_prefix="tvtool-rows")
            )
        # set by `stream_hashing`: sha256 of what is streamed (`merge_digests`)
        self.base_digests: StreamDigests | None = None
        self.term_digests: list[StreamDigests | None] = [None] * len(plan.terms)

    def stream_hashing(self, base: bool) -> list[int]:
        """Hash the base (with `base`) and the checkpoint terms not yet fingerprinted from the
        bytes this merge streams, where its path reads them raw; returns the terms left to
        hash otherwise (their indices)."""
        base_raw = self.slices if self.slices is not None else self.rows_base
        if base and base_raw is not None:
            self.base_digests = StreamDigests()
        raws = self.vec_slices if self.slices is not None else self.rows_vecs
        left = []
        for i, t in enumerate(self.plan.terms):
            if t.checkpoint is None or t.fingerprint:
                continue
            if self.stacked and i < len(raws) and raws[i] is not None:
                self.term_digests[i] = StreamDigests()
            else:
                left.append(i)
        return left

    def streamed_fingerprints(self) -> None:
        """Fill in the fingerprints of the terms hashed while streaming."""
        raws = self.vec_slices if self.slices is not None else self.rows_vecs
        for t, v, d, raw in zip(self.plan.terms, self.vecs, self.term_digests, raws, strict=False):
            if d is not None:
                t.fingerprint = d.fingerprint(v, raw)

    def fingerprints(self, base: str | None) -> str:
        """Fill in the checkpoint terms' fingerprints still missing and return the base's
        (`base` when known), from the open readers (tensors they read were hashed as read;
        only the others are read now)."""
        for t, v in zip(self.plan.terms, self.vecs, strict=True):
            if t.checkpoint is not None and not t.fingerprint:
                t.fingerprint = v.fingerprint()
        return base or self.base.fingerprint()

    def base_slices(self) -> SliceReader | None:
        """A new slice reader of the base (one per thread; the caller closes it)."""
        return SliceReader.of(self.base, stored=False)

    def cdtype(self, key: str) -> torch.dtype:
        return torch.float64 if self.base.meta(key).dtype == torch.float64 else torch.float32

    def _tau(self, i: int, key: str, base32: torch.Tensor | None) -> torch.Tensor:
        """Term i's task-vector tensor for `key`, whole and flat, in the compute dtype."""
        x = self.vecs[i].get(key)
        if self.is_ckpt[i]:  # a new tensor: never written into a reader's (mapped) memory
            b = base32 if base32 is not None else self.base.get(key).to(torch.float32)
            x = x.to(torch.float32).reshape(-1) - b.reshape(-1)
        return x.to(self.cdtype(key)).reshape(-1)

    def _mask(self, i: int, key: str) -> torch.Tensor | None:
        m = self.masks[i]
        return m.get(key).reshape(-1) if m is not None and key in m else None

    def thresholds(self, progress: Progress) -> None:
        """The global top-k pre-pass: in slices, `merge_rows.band_thresholds` (one streamed
        pass per vector); whole tensors: two streamed histogram passes per vector."""
        density = self.m.global_density(self.p)
        if self.slices is not None:
            band_thresholds(self, density, progress)
            return
        for i, t in enumerate(self.plan.terms):
            kth = KthLargest(topk_count(t.numel, density), t.numel)
            if kth.needs_passes:
                for n, add in enumerate((kth.add_pass1, kth.add_pass2)):
                    for j, key in enumerate(t.keys):
                        for x in self.term_slices(i, key, None):
                            add(x.abs_().to(torch.float32))
                        progress(
                            f"top-k {i + 1}/{len(self.states)}, pass {n + 1}", j + 1, len(t.keys)
                        )
                    if n == 0:
                        kth.end_pass1()
            self.states[i].topk = kth.result()

    def term_slices(
        self, i: int, key: str, base: SliceReader | None
    ) -> Iterator[torch.Tensor]:
        """Term i's tensor for `key` after the method's pre-trim steps, flat, in the compute
        dtype: whole, or in `CHUNK` slices (each valid until the next is read; a checkpoint
        term's base slices come from `base`, default the merge's reader)."""
        info = TensorInfo(key, self.base.meta(key).shape)
        if self.slices is None:
            yield self.m.before_trim(self._tau(i, key, None), info, self.states[i], self.p)
            return
        n = self.base.meta(key).numel
        for lo in range(0, n, self.chunk):
            x = self.term_slice(i, key, lo, min(n, lo + self.chunk), base)
            yield self.m.before_trim(x, info, self.states[i], self.p)

    def term_slice(
        self, i: int, key: str, lo: int, hi: int, base: SliceReader | None
    ) -> torch.Tensor:
        """Elements [lo, hi) of term i's tensor for `key` in the compute dtype (a checkpoint's:
        minus the base's, read from `base`, default the merge's reader)."""
        base32 = None
        if self.is_ckpt[i]:
            base32 = (base or self.slices).read(key, lo, hi).to(torch.float32, copy=True)
        return self._slice(i, key, lo, hi, base32, self.cdtype(key))

    def _slice(
        self, i: int, key: str, lo: int, hi: int, base32: torch.Tensor | None, cdt: torch.dtype
    ) -> torch.Tensor:
        """Elements [lo, hi) of term i's tensor for `key` (a checkpoint's: minus `base32`)."""
        x = self.vec_slices[i].read(key, lo, hi)
        if self.is_ckpt[i]:
            return x.to(torch.float32).sub_(base32).to(cdt)
        return x.to(cdt)

    def _coef(self, i: int, spec: TensorSpec, cdt: torch.dtype) -> torch.Tensor:
        c = coef_for_key(self.coefs[i], spec.name, spec.shape, self.layout, self.key_index)
        return (c.to(cdt) * self.plan.scale).reshape(-1)

    def _combine(
        self,
        ids: list[int],
        acc: torch.Tensor,
        term: Callable[[int], torch.Tensor],
        mask_of: Callable[[int], torch.Tensor | None],
        coefs: list[torch.Tensor] | None,
        info: TensorInfo,
        lo: int,
        hi: int,
    ) -> torch.Tensor:
        if coefs is not None:
            for i, c in zip(ids, coefs, strict=True):
                x = term(i)
                if c.numel() == 1:
                    acc.add_(x, alpha=float(c))
                else:
                    acc.addcmul_(x, c[lo:hi])
            return acc
        if self.m.weighted_sum(self.p):  # one term at a time: no list of T tensors
            for i in ids:
                x = self.m.term(term(i), info, self.states[i], self.p, mask_of(i))
                acc.add_(x, alpha=self.states[i].weight)
            return acc
        xs = [self.m.term(term(i), info, self.states[i], self.p, mask_of(i)) for i in ids]
        weights = [self.states[i].weight for i in ids]
        return self.m.combine(acc, xs, weights, self.plan.scale, self.p, info)

    def pieces(self, spec: TensorSpec) -> Iterator[torch.Tensor]:
        """The output tensor for `spec`, as consecutive flat pieces (base dtype or compute)."""
        key, ids = spec.name, self.plan.touched.get(spec.name)
        info = TensorInfo(key, tuple(spec.shape))
        n = 1
        for s in spec.shape:
            n *= s
        cdt = self.cdtype(key) if ids else None
        coefs = [self._coef(i, spec, cdt) for i in ids] if ids and self.coefs is not None else None
        if self.slices is None and self.rows_base is not None:
            h = self.base_digests.new(key) if self.base_digests is not None else None
            if ids and coefs is None and not self.m.weighted_sum(self.p):
                yield whole_rows(self, key, ids, n, h)
                return
            raw_dtype = self.base.meta(key).dtype
            tensor = self.rows_base.read_into(key, 0, n, self.ring.slot(n, raw_dtype))
            feed(h, tensor)
            if not ids:
                yield tensor  # copied as read (bit for bit unless --dtype casts it)
                return
            tensor = tensor.view(spec.shape)
        elif self.slices is None:
            tensor = self.base.get(key)
            if not ids:
                yield tensor  # copied as read (bit for bit unless --dtype casts it)
                return
        if self.slices is None:
            ckpt = any(self.is_ckpt[i] for i in ids)
            base32 = tensor.to(torch.float32, copy=True).reshape(-1) if ckpt else None
            owned = isinstance(self.base, SafetensorsReader)  # its reads are fresh tensors
            acc = (
                tensor.reshape(-1)
                if owned and tensor.dtype == cdt
                else tensor.to(cdt, copy=True).reshape(-1)
            )
            if self.stacked and coefs is None and not self.m.weighted_sum(self.p):
                yield whole_rows(self, key, ids, n, None, acc, base32)  # torch-format inputs
                return
            yield self._combine(
                ids, acc, lambda i: self._tau(i, key, base32), lambda i: self._mask(i, key),
                coefs, info, 0, n,
            )
            return
        h = self.base_digests.new(key) if self.base_digests is not None else None
        if ids and self.stacked and coefs is None:
            yield from stacked_pieces(self, key, ids, n, h)
            return
        dtype = self.base.meta(key).dtype
        for lo in range(0, n, self.chunk):
            hi = min(n, lo + self.chunk)
            acc = self.slices.read_into(key, lo, hi, self.ring.slot(hi - lo, dtype))
            feed(h, acc)
            if not ids:
                yield acc
                continue
            ckpt = any(self.is_ckpt[i] for i in ids)
            base32 = acc.to(torch.float32, copy=True) if ckpt else None
            acc = acc.to(cdt)

            def part(i: int, lo: int = lo, hi: int = hi, base32=base32) -> torch.Tensor:
                return self._slice(i, key, lo, hi, base32, cdt)

            def mask_of(i: int, lo: int = lo, hi: int = hi) -> torch.Tensor | None:
                m = self.mask_slices[i]
                return m.read(key, lo, hi) if m is not None and key in m else None

            yield self._combine(ids, acc, part, mask_of, coefs, info, lo, hi)

    def base_fingerprint(self) -> str | None:
        """The base's content fingerprint from the digests taken while reading it (None when
        it was not hashed so)."""
        if self.base_digests is None:
            return None
        raw = self.slices if self.slices is not None else self.rows_base
        return self.base_digests.fingerprint(self.base, raw)
