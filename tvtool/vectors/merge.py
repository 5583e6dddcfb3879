"""`merge`: stream the merged checkpoint that `merge_plan.plan_merge` laid out.

Execution walks the base's keys in order (see `merge_stream` for the per-key pipeline): an
untouched tensor is copied as read; a touched one reads the base and, per term, that term's data
for this key only. Global top-k trims first run `KthLargest` over each vector (two extra streamed
reads). Files go through `atomic_output`; shards are renamed into place together, then the
index is written; last, the recipe is stored as a `merge` object (tagged with `--name`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from tvtool.checkpoints.fingerprint import FingerprintCache
from tvtool.checkpoints.prefetch import WriteBehind
from tvtool.checkpoints.readers import open_checkpoint
from tvtool.checkpoints.writer import atomic_output, build_header
from tvtool.errors import TvtoolError
from tvtool.store.store import Store
from tvtool.vectors.merge_buffers import keep_freed_memory, tensor_bytes
from tvtool.vectors.merge_plan import MergePlan, PlannedTerm, plan_merge
from tvtool.vectors.merge_rows import single_threaded
from tvtool.vectors.merge_stream import MergeInputs, Progress
from tvtool.vectors.recipe import index_document
from tvtool.vectors.resize import pieces

__all__ = ["MergePlan", "MergeResult", "PlannedTerm", "execute_merge", "plan_merge"]


@dataclass
class MergeResult:
    digest: str
    files: list[Path]
    index: Path | None
    size: int
    seconds: float


def _noop(stage: str, done: int, total: int) -> None:
    pass


def execute_merge(store: Store, plan: MergePlan, progress: Progress = _noop) -> MergeResult:
    """Stream the merged checkpoint to disk (written behind, `WriteBehind`), then record the
    recipe in the store. Fingerprints the plan did not compute come from the cache (files
    unchanged), else from the bytes the merge streams (`merge_digests`; torch-format inputs:
    the readers hash what they read; a method that is not `stacked`: a thread hashes the
    checkpoint terms meanwhile); the headers, written first with placeholders of the same
    length, are rewritten before the files are renamed into place."""
    t0 = time.perf_counter()
    force = plan.request.force
    keep_freed_memory()
    if plan.layout is not None and plan.layout.folder is not None:
        plan.layout.folder.mkdir(exist_ok=True)
    cache = FingerprintCache(store.root / "cache" / "fingerprints")
    with ExitStack() as stack:
        inputs = MergeInputs(stack, store, plan)
        stack.enter_context(single_threaded())  # parallel by explicit threads instead
        base_fp = plan.fingerprint or cache.get(inputs.base)  # unchanged files: not rehashed
        for t, v in zip(plan.terms, inputs.vecs, strict=True):
            if t.checkpoint is not None and not t.fingerprint:
                t.fingerprint = cache.get(v)
        hashing = None
        if not plan.hashed:  # hashed from the bytes the merge streams (`merge_digests`)
            left = inputs.stream_hashing(base_fp is None)
            if left and inputs.slices is not None:  # slices bypass the readers' own hashing
                pool = stack.enter_context(ThreadPoolExecutor(1))  # so: meanwhile, on a thread
                hashing = pool.submit(_hash_terms, plan, left)
        if plan.method.global_density(plan.params) is not None:
            inputs.thresholds(progress)
        done = 0
        written = []
        for path, specs in plan.files:
            f = stack.enter_context(atomic_output(path, force=force))
            written.append((f, specs, f.write(build_header(specs, plan.metadata))))
            out = WriteBehind(f, hashed=False)  # pieces come from `inputs.ring` or are fresh
            stack.callback(out.close)
            for spec in specs:
                key = replace(spec, name=plan.key_of.get(spec.name, spec.name))
                parts = pieces(inputs, plan.grown, key)  # a grown vocabulary: rows appended
                size = sum(out.write(tensor_bytes(piece.to(spec.dtype))) for piece in parts)
                if size != spec.nbytes:  # pragma: no cover - pieces cover the tensor exactly
                    raise TvtoolError(f"internal error: {spec.name} wrote {size} bytes")
                done += 1
                progress("merge", done, len(plan.specs))
            out.wait()  # every byte written (a write's error raised here), before the header
        if not plan.hashed:  # the real headers once the fingerprints are known
            if hashing is not None:
                hashing.result()
            inputs.streamed_fingerprints()
            base_fp = base_fp or inputs.base_fingerprint()
            plan.finalize(inputs.fingerprints(base_fp))
            for f, specs, header_size in written:
                header = build_header(specs, plan.metadata)
                if len(header) != header_size:  # pragma: no cover - digests have fixed lengths
                    raise TvtoolError("internal error: the final header changed size")
                f.seek(0)
                f.write(header)
        cache.put(inputs.base, plan.fingerprint)
        for t, v in zip(plan.terms, inputs.vecs, strict=True):
            if t.checkpoint is not None:
                cache.put(v, t.fingerprint)
    if plan.index is not None:
        with atomic_output(plan.index, force=force) as f:
            f.write(index_document(plan.files, plan.metadata))
    if plan.layout is not None:
        plan.layout.finish()
    inputs_digests = {t.digest for t in plan.terms if t.digest} | {
        t.mask for t in plan.terms if t.mask
    }
    files = [f.name for f, _ in plan.files] + ([plan.index.name] if plan.index else [])
    manifest = store.put_json(
        plan.recipe.document(),
        kind="merge",
        inputs=sorted(inputs_digests | ({plan.coefs} if plan.coefs else set())),
        params={
            "files": files,
            "tensors": len(plan.specs),
            "touched": len(plan.touched),
            "size": plan.total_size,
        },
    )
    if manifest.digest != plan.digest:  # pragma: no cover - canonical JSON is deterministic
        raise TvtoolError("internal error: the stored recipe's digest differs from the plan's")
    if plan.request.name:
        try:
            store.set_ref(plan.request.name, plan.digest)
        except TvtoolError as e:
            raise TvtoolError(f"merged as {plan.digest[:12]}, but not named: {e}") from None
    return MergeResult(
        plan.digest,
        [f for f, _ in plan.files],
        plan.index,
        plan.total_size,
        time.perf_counter() - t0,
    )


def _hash_terms(plan: MergePlan, ids: list[int]) -> None:
    """sha256 of the checkpoint terms `ids` (on a thread, while merging)."""
    for t in (plan.terms[i] for i in ids):
        if t.checkpoint is not None and not t.fingerprint:
            with open_checkpoint(t.checkpoint) as r:
                t.fingerprint = r.fingerprint()
