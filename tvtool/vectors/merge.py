"""`merge`: plan (validate, resolve, lay out the output), then stream the merged checkpoint.

Planning reads only headers (plus, unless deferred, the base's sha256). Execution walks the
base's keys in order (see `merge_stream` for the per-key pipeline): an untouched tensor is copied
as read; a touched one reads the base and, per term, that term's data for this key only. Global
top-k trims (ties/magnitude) first run `KthLargest` over each vector (two extra streamed reads).
Files go through `atomic_output`; shards are renamed into place together, then the index is
written; last, the recipe is stored as a `merge` object.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tvtool.checkpoints.readers import TensorMeta, open_checkpoint
from tvtool.checkpoints.writer import TensorSpec, atomic_output, build_header, parse_dtype
from tvtool.errors import TvtoolError, few
from tvtool.store.manifest import canonical_json
from tvtool.store.store import Store
from tvtool.vectors.filters import TensorFilter
from tvtool.vectors.merge_stream import (
    MergeInputs,
    Progress,
    keep_freed_memory,
    load_coefs,
    write_bytes,
)
from tvtool.vectors.methods import MergeParams
from tvtool.vectors.recipe import (
    MergeRequest,
    build_recipe,
    index_document,
    output_files,
    provenance_metadata,
)
from tvtool.vectors.stored import open_tensor_object
from tvtool.vectors.terms import Term, default_scale

PENDING = "0" * 64  # same length as a sha256: headers keep their size once it is known


@dataclass
class PlannedTerm:
    label: str  # as written (or the digest)
    digest: str
    weight: float
    mask: str | None = None
    keys: list[str] = field(default_factory=list)  # tensors it changes, in base order
    numel: int = 0
    extracted_from: str | None = None  # sha256 of the base the vector was extracted from


@dataclass
class MergePlan:
    request: MergeRequest
    params: MergeParams
    terms: list[PlannedTerm]
    coefs: str | None
    specs: list[TensorSpec]  # the output, in base key order
    touched: dict[str, list[int]]  # key -> indices of the terms that change it
    skipped: list[str]  # offenders skipped under --allow-missing
    files: list[tuple[Path, list[TensorSpec]]]
    index: Path | None
    fingerprint: str | None = None  # the base's sha256 (None: hashed while merging)
    recipe: dict = field(default_factory=dict)
    digest: str = PENDING  # sha256 of the canonical recipe = the merge object's digest
    metadata: dict[str, str] = field(default_factory=dict)
    extra_metadata: dict[str, str] = field(default_factory=dict)  # e.g. tvtool.activation
    image_tower_only: bool = False  # a CLIP base whose text transformer was deleted

    def finalize(self, fingerprint: str | None) -> None:
        """Fill in what depends on the base's sha256: recipe, digest and metadata (None:
        placeholders of the same length, so that a header written early keeps its size)."""
        expect = self.request.expect_base
        if fingerprint and expect and fingerprint != expect:
            raise TvtoolError(
                f"{self.request.base} is not the recipe's base (sha256 "
                f"{fingerprint[:12]}, the recipe needs {expect[:12]})"
            )
        self.fingerprint = fingerprint
        terms = [(t.digest, t.weight, t.mask) for t in self.terms]
        self.recipe = build_recipe(
            self.request, fingerprint or PENDING, self.params.recorded(), terms, self.coefs
        )
        self.digest = (
            hashlib.sha256(canonical_json(self.recipe)).hexdigest() if fingerprint else PENDING
        )
        self.metadata = {**provenance_metadata(self.recipe, self.digest), **self.extra_metadata}

    def foreign_terms(self) -> list[PlannedTerm]:
        """Terms whose vector was extracted from another base file than this one (a warning:
        the same weights saved in another format have another sha256)."""
        fp = self.fingerprint
        return [t for t in self.terms if fp and t.extracted_from and t.extracted_from != fp]

    @property
    def total_size(self) -> int:
        return sum(
            len(build_header(s, self.metadata)) + sum(x.nbytes for x in s) for _, s in self.files
        )


def _few(items: list[str], n: int = 3) -> str:
    return few(items, n)


def _attach_masks(store: Store, req: MergeRequest, terms: list[PlannedTerm]) -> None:
    if req.method != "mask":
        if req.masks:
            raise TvtoolError("--mask is only used with --method mask")
        return
    by_vector: dict[str, str] = {}
    for ref in req.masks:
        digest = store.resolve(ref, kind="mask")
        target = store.manifest(digest).params.get("vector")
        if not isinstance(target, str):
            raise TvtoolError(f"mask {ref!r} does not name its vector (params.vector)")
        try:
            target = store.resolve(target)
        except TvtoolError:
            pass  # a vector not in this store: no term will match it
        if by_vector.setdefault(target, digest) != digest:
            raise TvtoolError(f"two masks given for vector {target[:12]}")
    unused = [d[:12] for d in by_vector if d not in {t.digest for t in terms}]
    if unused:
        raise TvtoolError(f"--mask for a vector that is not a term: {', '.join(unused)}")
    for t in terms:
        if t.digest not in by_vector:
            raise TvtoolError(f"no --mask for term {t.label!r} (masks name it in params.vector)")
        t.mask = by_vector[t.digest]


def _match_keys(store, t: PlannedTerm, metas: dict[str, TensorMeta], keep) -> list[str]:
    """Fill `t.keys` with the tensors it changes; return offender descriptions."""
    missing, bad = [], []
    with ExitStack() as stack:
        reader = stack.enter_context(open_tensor_object(store, t.digest, "vector")[1])
        mask = stack.enter_context(open_tensor_object(store, t.mask, "mask")[1]) if t.mask else None
        for k in reader.keys():
            if not keep(k):
                continue
            shape, base = reader.meta(k).shape, metas.get(k)
            if base is None:
                missing.append(k)
            elif base.shape != shape or not base.dtype.is_floating_point:
                bad.append(f"{k} {list(shape)} vs base {list(base.shape)} {base.dtype}")
            else:
                if mask is not None and k in mask and mask.meta(k).shape != shape:
                    raise TvtoolError(
                        f"mask {t.mask[:12]}: {k} has shape "
                        f"{list(mask.meta(k).shape)}, the vector {list(shape)}"
                    )
                t.keys.append(k)
                t.numel += base.numel
    out = []
    if missing:
        out.append(f"{t.label}: {len(missing)} tensor(s) not in the base ({_few(missing)})")
    if bad:
        out.append(f"{t.label}: {len(bad)} shape/dtype mismatch(es) ({_few(bad, 2)})")
    return out


def plan_merge(store: Store, req: MergeRequest, *, hash_base: bool = True) -> MergePlan:
    """Validate everything and lay out the output; reads headers and (with `hash_base`) the
    base's sha256. Without it, `execute_merge` hashes the base while it merges."""
    out_dtype = parse_dtype(req.dtype)
    tfilter = TensorFilter(req.include, req.exclude)
    coefs_digest, layout = None, None
    if req.coefs:
        if req.terms:
            raise TvtoolError("with --coefs the vectors come from the coefficients: drop the TERMs")
        if req.method != "sum" or req.masks:
            raise TvtoolError("--coefs applies learned coefficients: use --method sum, no --mask")
        coefs_digest, _, layout = load_coefs(store, req.coefs)
        req.terms = [Term(ref=d, weight=1.0) for d in layout.vectors]
    if not req.terms:
        raise TvtoolError("nothing to merge: give at least one TERM (VECTOR[:WEIGHT]) or --coefs")
    scale = req.scale
    if scale is None:
        scale = 1.0 if req.coefs else default_scale(req.method, req.then, req.terms)
    params = MergeParams(req.method, scale, req.density, req.scope, req.drop, req.then, req.seed)
    params.validate()
    default_weight = scale if params.combiner == "sum" else 1.0
    terms = [
        PlannedTerm(str(t), store.resolve(t.ref, kind="vector"), t.resolved_weight(default_weight))
        for t in req.terms
    ]
    if req.coefs:
        for t in terms:
            t.weight = scale
            t.label = store.display_name(t.digest)  # a name, not the 64-hex digest
    _attach_masks(store, req, terms)
    for t in terms:
        source = store.manifest(t.digest).params.get("base")
        if isinstance(source, dict) and isinstance(source.get("fingerprint"), str):
            t.extracted_from = source["fingerprint"]

    from tvtool.models.activation import checkpoint_activation

    with open_checkpoint(req.base) as base:
        metas = {k: base.meta(k) for k in base.keys()}
        fingerprint = base.fingerprint() if hash_base else None
        activation = checkpoint_activation(base)  # carried over, so eval builds the same model
    index = layout.key_index() if layout else None
    keep = (lambda k: tfilter(k) and k in index) if index is not None else tfilter
    order = {k: i for i, k in enumerate(metas)}
    offenders: list[str] = []
    touched: dict[str, list[int]] = {}
    for i, t in enumerate(terms):
        offenders += _match_keys(store, t, metas, keep)
        t.keys.sort(key=order.__getitem__)
        for k in t.keys:
            touched.setdefault(k, []).append(i)
    if offenders and not req.allow_missing:
        raise TvtoolError("; ".join(offenders) + " (use --allow-missing to skip them)")

    def out_type(m: TensorMeta) -> torch.dtype:
        return out_dtype if out_dtype is not None and m.dtype.is_floating_point else m.dtype

    specs = [TensorSpec(k, m.shape, out_type(m)) for k, m in metas.items()]
    out = req.out / "model.safetensors" if req.out.is_dir() else req.out
    if not out.parent.is_dir():
        raise TvtoolError(f"output directory {out.parent} does not exist")
    files, index_path = output_files(out, specs, req.shard_size)
    exists = [str(p) for p in [*(f for f, _ in files), index_path] if p is not None and p.exists()]
    if exists and not req.force:
        raise TvtoolError(f"{_few(exists, 2)} exists; use --force to overwrite")
    plan = MergePlan(req, params, terms, coefs_digest, specs, touched, offenders, files, index_path)
    if activation:
        plan.extra_metadata["tvtool.activation"] = activation
    plan.image_tower_only = any(k.startswith("visual.") for k in metas) and not any(
        k.startswith("transformer.") for k in metas
    ) and any(k.startswith(("token_embedding.", "text_projection")) for k in metas)
    plan.finalize(fingerprint)
    return plan


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
    """Stream the merged checkpoint to disk, then record the recipe in the store. A base not
    hashed by the plan is hashed on a thread while merging; the headers, written first with
    placeholders of the same length, are rewritten before the files are renamed into place."""
    t0 = time.perf_counter()
    force = plan.request.force
    keep_freed_memory()
    with ExitStack() as stack:
        inputs = MergeInputs(stack, store, plan)
        hashing = None
        if plan.fingerprint is None:
            pool = stack.enter_context(ThreadPoolExecutor(1))
            hashing = pool.submit(inputs.base.fingerprint)
        if "trim" in plan.params.steps and plan.params.scope == "global":
            inputs.thresholds(progress)
        done = 0
        for path, specs in plan.files:
            f = stack.enter_context(atomic_output(path, force=force))
            header_size = f.write(build_header(specs, plan.metadata))
            for spec in specs:
                size = sum(write_bytes(f, piece.to(spec.dtype)) for piece in inputs.pieces(spec))
                if size != spec.nbytes:  # pragma: no cover - pieces cover the tensor exactly
                    raise TvtoolError(f"internal error: {spec.name} wrote {size} bytes")
                done += 1
                progress("merge", done, len(plan.specs))
            if hashing is not None:  # the real header once the base's sha256 is known
                plan.finalize(hashing.result())
                header = build_header(specs, plan.metadata)
                if len(header) != header_size:  # pragma: no cover - digests have fixed lengths
                    raise TvtoolError("internal error: the final header changed size")
                f.seek(0)
                f.write(header)
    if plan.index is not None:
        with atomic_output(plan.index, force=force) as f:
            f.write(index_document(plan.files, plan.metadata))
    inputs_digests = {t.digest for t in plan.terms} | {t.mask for t in plan.terms if t.mask}
    files = [f.name for f, _ in plan.files] + ([plan.index.name] if plan.index else [])
    manifest = store.put_json(
        plan.recipe,
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
    return MergeResult(
        plan.digest,
        [f for f, _ in plan.files],
        plan.index,
        plan.total_size,
        time.perf_counter() - t0,
    )
