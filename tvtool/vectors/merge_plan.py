"""Planning a merge: validate the request, resolve terms, match keys, lay out the output.

Planning reads only headers (plus, when asked, the sha256 of the base and of checkpoint terms;
otherwise `merge.execute_merge` hashes them while it merges). A term is a stored vector (ref,
digest or prefix) or a checkpoint (a file or folder that exists: its task vector against the
base is computed on the fly, never stored).
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tvtool.checkpoints.keymaps import align_vector
from tvtool.checkpoints.readers import SafetensorsReader, TensorMeta, open_checkpoint
from tvtool.checkpoints.writer import TensorSpec, build_header, parse_dtype
from tvtool.errors import TvtoolError, few
from tvtool.store.manifest import canonical_json
from tvtool.store.store import Store, check_ref_name
from tvtool.vectors.extract import ADDED
from tvtool.vectors.filters import TensorFilter
from tvtool.vectors.merge_out import OutputLayout, plan_output, refuse_existing
from tvtool.vectors.methods import get_method
from tvtool.vectors.methods.base import Method, Params
from tvtool.vectors.recipe import (
    MergeRecipe,
    MergeRequest,
    OutputOptions,
    RecipeTerm,
    provenance_metadata,
)
from tvtool.vectors.resize import (
    Grown,
    grown_specs,
    hf_config,
    is_added,
    plan_grown,
    resized_keys,
    shrink_problem,
)
from tvtool.vectors.stored import load_coefs, open_tensor_object
from tvtool.vectors.terms import Term, check_scale, default_scale

PENDING = "0" * 64  # same length as a sha256: headers keep their size once it is known


@dataclass
class PlannedTerm:
    label: str  # as written (or the digest)
    weight: float
    digest: str | None = None  # a stored vector
    checkpoint: Path | None = None  # a checkpoint, its task vector computed on the fly
    fingerprint: str | None = None  # the checkpoint's sha256 (None: hashed while merging)
    mask: str | None = None
    keys: list[str] = field(default_factory=list)  # tensors it changes, in base order
    numel: int = 0
    extracted_from: str | None = None  # sha256 of the base the vector was extracted from
    added: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (added rows, count)

    @property
    def identity(self) -> str:
        """What seeds this term's random draws: its digest or content sha256."""
        return self.digest or self.fingerprint or PENDING


@dataclass
class MergePlan:
    request: MergeRequest
    method: Method
    params: Params
    scale: float
    terms: list[PlannedTerm]
    coefs: str | None
    specs: list[TensorSpec]  # the output, in base key order
    touched: dict[str, list[int]]  # key -> indices of the terms that change it
    skipped: list[str]  # offenders skipped under --allow-missing
    files: list[tuple[Path, list[TensorSpec]]]
    index: Path | None
    fingerprint: str | None = None  # the base's sha256 (None: hashed while merging)
    recipe: MergeRecipe | None = None
    digest: str = PENDING  # sha256 of the canonical recipe = the merge object's digest
    metadata: dict[str, str] = field(default_factory=dict)
    layout: OutputLayout | None = None
    key_of: dict[str, str] = field(default_factory=dict)  # written name -> normalised key
    extra_metadata: dict[str, str] = field(default_factory=dict)  # e.g. tvtool.activation
    image_tower_only: bool = False  # a CLIP base whose text transformer was deleted
    grown: dict[str, Grown] = field(default_factory=dict)  # vocabulary resizes (`resize`)
    notes: list[str] = field(default_factory=list)  # warnings for people (stderr)

    @property
    def hashed(self) -> bool:
        return self.fingerprint is not None and all(
            t.fingerprint for t in self.terms if t.checkpoint is not None
        )

    def finalize(self, fingerprint: str | None) -> None:
        """Fill in what depends on the sha256s: recipe, digest and metadata (placeholders of
        the same length until all are known, so that a header written early keeps its size).
        Raises when the base is not the recipe's or another base's vectors are refused."""
        req = self.request
        if fingerprint and req.expect_base and fingerprint != req.expect_base:
            raise TvtoolError(
                f"{req.base} is not the recipe's base (sha256 "
                f"{fingerprint[:12]}, the recipe needs {req.expect_base[:12]})"
            )
        for t, want in zip(self.terms, req.expect_terms, strict=False):
            if want and t.fingerprint and t.fingerprint != want:
                raise TvtoolError(
                    f"{t.checkpoint} is not the recipe's checkpoint (sha256 {t.fingerprint[:12]}, "
                    f"the recipe needs {want[:12]})"
                )
        self.fingerprint = fingerprint
        foreign = self.foreign_terms()
        if foreign and not req.allow_other_base:
            t = foreign[0]
            raise TvtoolError(
                f"{t.label} was extracted from another base (sha256 {t.extracted_from[:12]}) "
                f"than {req.base} ({fingerprint[:12]}); use --allow-other-base to merge anyway"
            )
        out = OutputOptions(**{k: getattr(req, k) for k in OutputOptions.model_fields})
        self.recipe = MergeRecipe(
            base=fingerprint or PENDING,
            method=self.params,
            scale=self.scale,
            terms=[
                RecipeTerm(
                    vector=t.digest,
                    checkpoint=(t.fingerprint or PENDING) if t.checkpoint else None,
                    path=str(t.checkpoint) if t.checkpoint else None,
                    weight=t.weight,
                    mask=t.mask,
                )
                for t in self.terms
            ],
            coefs=self.coefs,
            output=out,
        )
        done = self.hashed
        doc = self.recipe.document()
        self.digest = hashlib.sha256(canonical_json(doc)).hexdigest() if done else PENDING
        self.metadata = {**provenance_metadata(self.recipe, self.digest), **self.extra_metadata}

    def foreign_terms(self) -> list[PlannedTerm]:
        """Terms whose vector was extracted from another base file than this one."""
        fp = self.fingerprint
        return [t for t in self.terms if fp and t.extracted_from and t.extracted_from != fp]

    @property
    def total_size(self) -> int:
        return sum(
            len(build_header(s, self.metadata)) + sum(x.nbytes for x in s) for _, s in self.files
        )


def _attach_masks(store: Store, req: MergeRequest, method: Method, terms: list[PlannedTerm]):
    if not method.uses_masks:
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


def _open_term(store: Store, t: PlannedTerm):
    if t.checkpoint is not None:
        return open_checkpoint(t.checkpoint)
    return open_tensor_object(store, t.digest, "vector")[1]


def _match_keys(store, t: PlannedTerm, metas: dict[str, TensorMeta], keep) -> list[str]:
    """Fill `t.keys` with the tensors it changes; return offender descriptions. A checkpoint's
    non-float tensors are skipped (they are copied from the base)."""
    missing, bad = [], []
    with ExitStack() as stack:
        reader = align_vector(stack.enter_context(_open_term(store, t)), metas)  # HF layouts
        mask = stack.enter_context(open_tensor_object(store, t.mask, "mask")[1]) if t.mask else None
        resized = resized_keys(store.manifest(t.digest)) if t.digest else {}
        rows_differ = False  # a shape mismatch in the first dimension only
        names = set(reader.keys())
        for k in reader.keys():
            meta = reader.meta(k)
            if not keep(k) or (t.checkpoint is not None and not meta.dtype.is_floating_point):
                continue
            shape, base = meta.shape, metas.get(k)
            if resized and base is None and is_added(k, names):  # rows a resize added
                stem = k[: -len(ADDED)]
                if keep(stem) and stem in metas:
                    t.added[stem] = (k, shape[0])
                continue
            if base is None:
                missing.append(k)
            elif base.shape != shape or not base.dtype.is_floating_point:
                shrink = shrink_problem(t.label, k, shape, base, resized) if resized else None
                if shrink:
                    raise TvtoolError(shrink)
                bad.append(f"{k} {list(shape)} vs base {list(base.shape)} {base.dtype}")
                rows_differ |= bool(shape) and shape[1:] == base.shape[1:] and not resized
            else:
                if mask is not None and k in mask and mask.meta(k).shape != shape:
                    raise TvtoolError(
                        f"mask {t.mask[:12]}: {k} has shape "
                        f"{list(mask.meta(k).shape)}, the vector {list(shape)}"
                    )
                t.keys.append(k)
                t.numel += base.numel
        t.added = {k: v for k, v in t.added.items() if k in t.keys}  # its shared rows matched
        if t.checkpoint is not None and hasattr(reader, "fingerprint") and t.fingerprint == "":
            t.fingerprint = reader.fingerprint()
    out = []
    if missing:
        out.append(f"{t.label}: {len(missing)} tensor(s) not in the base ({few(missing)})")
    if bad:
        hint = (" (a vocabulary resize? extract it with --allow-resize and merge the vector)"
                if rows_differ else "")
        out.append(f"{t.label}: {len(bad)} shape/dtype mismatch(es) ({few(bad, 2)}){hint}")
    return out


def _checkpoint_path(store: Store, ref: str) -> Path | None:
    """`ref` as a checkpoint path when such a file or folder exists (refused when it is also a
    ref name: write ./NAME for the file)."""
    p = Path(ref).expanduser()
    if not p.exists():
        return None
    try:
        store.resolve(ref)
    except TvtoolError:
        return p.resolve()
    raise TvtoolError(f"term {ref!r} is both a file and a stored ref: write ./{ref} for the file")


def _planned(store: Store, term: Term, weight: float) -> PlannedTerm:
    path = _checkpoint_path(store, term.ref)
    if path is not None:
        return PlannedTerm(str(term), weight, checkpoint=path)
    t = PlannedTerm(str(term), weight, digest=store.resolve(term.ref, kind="vector"))
    source = store.manifest(t.digest).params.get("base")
    if isinstance(source, dict) and isinstance(source.get("fingerprint"), str):
        t.extracted_from = source["fingerprint"]
    return t


def plan_merge(store: Store, req: MergeRequest, *, hash_base: bool = True) -> MergePlan:
    """Validate everything and lay out the output; reads headers and (with `hash_base`) the
    sha256 of the base and of checkpoint terms. Without it, `execute_merge` hashes them while
    it merges (random methods always hash checkpoint terms first: their draws are seeded by it)."""
    method, params = get_method(req.method_name), req.method
    out_dtype = parse_dtype(req.dtype)
    if req.name is not None:
        check_ref_name(req.name)
    tfilter = TensorFilter(req.include, req.exclude)
    coefs_digest, layout = None, None
    if req.coefs:
        if req.terms:
            raise TvtoolError("with --coefs the vectors come from the coefficients: drop the TERMs")
        if req.method_name != "sum" or req.masks:
            raise TvtoolError("--coefs applies learned coefficients: use --method sum, no --mask")
        manifest, _, layout = load_coefs(store, req.coefs)
        coefs_digest = manifest.digest
        req.terms = [Term(ref=d, weight=1.0) for d in layout.vectors]
    if not req.terms:
        raise TvtoolError("nothing to merge: give at least one TERM (VECTOR[:WEIGHT]) or --coefs")
    problem = method.check(params, len(req.terms))
    if problem:
        raise TvtoolError(problem)
    summed = method.weighted_sum(params)
    scale = req.scale
    if scale is None:
        scale = 1.0 if req.coefs else default_scale(summed, len(req.terms))
    check_scale(scale)
    default_weight = scale if summed else 1.0
    terms = [_planned(store, t, t.resolved_weight(default_weight)) for t in req.terms]
    if req.coefs:
        for t in terms:
            t.weight = scale
            t.label = store.display_name(t.digest)  # a name, not the 64-hex digest
    _attach_masks(store, req, method, terms)
    seeded = getattr(method, "random", False)
    for t in terms:
        if t.checkpoint is not None and (hash_base or seeded):
            t.fingerprint = ""  # ask _match_keys to hash it

    from tvtool.checkpoints.activation import checkpoint_activation

    with open_checkpoint(req.base) as base:
        metas = {k: base.meta(k) for k in base.keys()}
        fingerprint = base.fingerprint() if hash_base else None
        st_base = isinstance(base, SafetensorsReader)
        raw = {k: base.raw_name(k) for k in metas} if st_base else {}  # names as written
        shard_of = {k: base.shard_of(k).name for k in metas} if st_base else None
        index_name = base.path.name if base.path.name.endswith(".index.json") else None
        activation = checkpoint_activation(base)  # carried over, so eval builds the same model
    index = layout.key_index() if layout else None
    keep = (lambda k: tfilter(k) and k in index) if index is not None else tfilter
    order = {k: i for i, k in enumerate(metas)}
    offenders: list[str] = []
    touched: dict[str, list[int]] = {}
    for i, t in enumerate(terms):
        offenders += _match_keys(store, t, metas, keep)
        t.fingerprint = t.fingerprint or None
        t.keys.sort(key=order.__getitem__)
        for k in t.keys:
            touched.setdefault(k, []).append(i)
    if offenders and not req.allow_missing:
        raise TvtoolError("; ".join(offenders) + " (use --allow-missing to skip them)")

    def out_type(m: TensorMeta) -> torch.dtype:
        return out_dtype if out_dtype is not None and m.dtype.is_floating_point else m.dtype

    grown = plan_grown(terms, metas)
    specs = grown_specs([TensorSpec(k, m.shape, out_type(m)) for k, m in metas.items()], grown)
    layout = plan_output(req.base, req.out, specs, raw, shard_of, index_name, req.shard_size)
    notes = hf_config(req.base, layout, grown, metas)
    refuse_existing(layout, req.force)
    plan = MergePlan(
        req, method, params, scale, terms, coefs_digest, specs, touched, offenders,
        layout.files, layout.index, layout=layout, key_of={raw.get(k, k): k for k in metas},
    )
    plan.grown, plan.notes = grown, notes
    if activation:
        plan.extra_metadata["tvtool.activation"] = activation
    if grown:
        plan.extra_metadata["tvtool.resized"] = canonical_json(
            {k: [g.base_rows, g.rows] for k, g in grown.items()}).decode()
    plan.image_tower_only = any(k.startswith("visual.") for k in metas) and not any(
        k.startswith("transformer.") for k in metas
    ) and any(k.startswith(("token_embedding.", "text_projection")) for k in metas)
    plan.finalize(fingerprint)
    return plan
