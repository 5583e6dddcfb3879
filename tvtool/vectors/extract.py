"""Extract a task vector `tau = finetuned - base` into the store, one tensor pair at a time.

Both checkpoints are opened lazily (safetensors / memory-mapped torch files); for every selected
key the two tensors are read, subtracted in float32, checked for NaN/Inf, cast to the storage
dtype (the largest rounding error is tracked) and streamed into a `vector` object. Peak memory
is about one tensor pair, never two models. The stored bytes depend only on the inputs and the
options, so extracting the same pair twice yields the same digest (one object).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from tvtool.checkpoints.fingerprint import FingerprintCache
from tvtool.checkpoints.keymaps import align_submodel
from tvtool.checkpoints.pairing import pair_readers
from tvtool.checkpoints.readahead import ReadAhead
from tvtool.checkpoints.readers import CheckpointReader, open_checkpoint
from tvtool.checkpoints.writer import TensorSpec
from tvtool.errors import TvtoolError, few
from tvtool.store.manifest import Manifest
from tvtool.store.store import Store, check_ref_name
from tvtool.vectors.filters import TensorFilter
from tvtool.vectors.stored import write_tensor_object

STORAGE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SHOW = 5  # offending keys named in a mismatch error


@dataclass
class ExtractResult:
    manifest: Manifest
    name: str | None
    deduplicated: bool  # the same vector was already in the store
    skipped_non_float: list[str] = field(default_factory=list)
    filtered_out: int = 0

    @property
    def digest(self) -> str:
        return self.manifest.digest


@dataclass
class _Accum:
    sumsq: float = 0.0
    max_round: float = 0.0
    nonfinite: int = 0


def _names(keys: list[str], more: int = 0) -> str:
    return few(keys, SHOW, more)


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


ADDED = ".added_rows"  # suffix of the stored rows a resized fine-tune added (kept whole)


def plan_keys(
    base: CheckpointReader, ft: CheckpointReader, keep: Callable[[str], bool],
    resized: dict[str, dict[str, int | str]] | None = None,
) -> tuple[list[TensorSpec], list[str], int]:
    """(float tensors to extract as fp32 specs, skipped non-float keys, keys filtered out).

    Raises a TvtoolError naming the first offending keys when the two checkpoints disagree on the
    selected keys or their shapes."""
    bkeys, fkeys = set(base.keys()), set(ft.keys())
    union = sorted(bkeys | fkeys)
    if isinstance(keep, TensorFilter):
        keep = keep.bind(union)  # presets that depend on the layout (bare 5.x CLIP towers)
    selected = [k for k in union if keep(k)]
    filtered_out = len(union) - len(selected)
    if not selected:
        raise TvtoolError(
            "no tensors selected: check --include/--exclude/--preset against the key names"
        )
    skipped: list[str] = []
    only_base, only_ft = [], []
    for k in selected:  # non-float tensors on one side only (position_ids buffers): skipped
        if k not in fkeys or k not in bkeys:
            one = base if k in bkeys else ft
            if not _is_float(one.meta(k).dtype):
                skipped.append(k)
            else:
                (only_base if k in bkeys else only_ft).append(k)
    shape_bad: list[str] = []
    kind_bad: list[str] = []
    specs: list[TensorSpec] = []
    for k in selected:
        if k not in bkeys or k not in fkeys:
            continue
        mb, mf = base.meta(k), ft.meta(k)
        fb, ff = _is_float(mb.dtype), _is_float(mf.dtype)
        if fb != ff:
            kind_bad.append(f"{k} ({_dt(mb.dtype)} vs {_dt(mf.dtype)})")
        elif (mb.shape != mf.shape and resized is not None and fb and len(mb.shape) >= 1
              and mb.shape[1:] == mf.shape[1:]):  # --allow-resize: a vocabulary resize
            n = min(mb.shape[0], mf.shape[0])
            specs.append(TensorSpec(k, (n, *mb.shape[1:]), torch.float32))
            resized[k] = {"base_rows": mb.shape[0], "finetuned_rows": mf.shape[0]}
            if mf.shape[0] > n:
                specs.append(TensorSpec(k + ADDED, (mf.shape[0] - n, *mf.shape[1:]),
                                        torch.float32))
                resized[k]["added_rows"] = k + ADDED
        elif mb.shape != mf.shape:
            shape_bad.append(f"{k} ({list(mb.shape)} vs {list(mf.shape)})")
        elif not fb:
            skipped.append(k)
        else:
            specs.append(TensorSpec(k, mb.shape, torch.float32))
    problems = []
    if only_base:
        problems.append(f"{len(only_base)} key(s) only in the base: {_names(only_base)}")
    if only_ft:
        problems.append(f"{len(only_ft)} key(s) only in the fine-tuned model: {_names(only_ft)}")
    if shape_bad:
        problems.append(f"{len(shape_bad)} shape mismatch(es): {_names(shape_bad)}")
    if kind_bad:
        problems.append(f"{len(kind_bad)} float/non-float mismatch(es): {_names(kind_bad)}")
    if problems:
        hint = ""
        if any(k.endswith("lm_head.weight") for k in only_base + only_ft):
            hint = (" (tied embeddings? put the model's config.json, with tie_word_embeddings, "
                    "beside the checkpoint that lacks lm_head.weight)")
        elif only_base and only_ft:
            hint = " (keys named differently? see --rename REGEX=REPL)"
        raise TvtoolError("checkpoints do not match: " + "; ".join(problems) + hint)
    if not specs:
        raise TvtoolError(f"no floating-point tensors selected ({len(skipped)} non-float skipped)")
    return specs, skipped, filtered_out


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _source(reader: CheckpointReader, fingerprint: bool = True) -> dict[str, str]:
    """Where a checkpoint came from, with its content fingerprint (a full read unless the
    tensors were read already; `fingerprint=False`: filled in by the caller after its pass)."""
    return {
        "path": str(Path(reader.path).resolve()),
        "fingerprint": reader.fingerprint() if fingerprint else "",
        "format": reader.format,
    }


def extract_vector(
    store: Store,
    base_path: str | Path,
    finetuned_path: str | Path,
    *,
    keep: TensorFilter | None = None,
    dtype: torch.dtype = torch.float32,
    allow_nonfinite: bool = False,
    allow_resize: bool = False,
    name: str | None = None,
    force: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    renames: list[str] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Store `finetuned - base` as a `vector` object (tagged `name` if given); names are
    lined up first (`checkpoints.pairing`: prefixes, `renames`, tied embeddings).

    One read of each input tensor: it is hashed for the content fingerprints as it is read
    (`checkpoints.fingerprint`), subtracted once, and checked for NaN/Inf through its norm
    (a sum of squares is finite iff every entry is, overflow aside, which the slow path
    tells apart). The manifest records `base_fingerprint` (content, format-independent) and
    `sources`: every (base, fine-tune) file pair the same vector was extracted from."""
    if dtype not in STORAGE_NAMES:
        raise TvtoolError(f"cannot store task vectors as {dtype}: use fp32, fp16 or bf16")
    if name is not None:
        check_ref_name(name)
    keep = keep or TensorFilter()
    cache = FingerprintCache(store.root / "cache" / "fingerprints")
    with open_checkpoint(base_path) as base, open_checkpoint(finetuned_path) as ft:
        opened = (base, ft)
        for r in opened:
            cache.apply(r)  # a base hashed before is not hashed again while unchanged
        base, ft, submodel = align_submodel(base, ft)  # HF CLIPVisionModel of a CLIPModel
        base, ft, notes = pair_readers(base, ft, renames)
        for note in notes:
            if on_note:
                on_note(note)
        resized: dict[str, dict[str, int | str]] | None = {} if allow_resize else None
        fp32_specs, skipped, filtered_out = plan_keys(base, ft, keep, resized)
        specs = [TensorSpec(s.name, s.shape, dtype) for s in fp32_specs]
        created = datetime.now(timezone.utc).isoformat()
        params: dict = {
            "base": _source(base, fingerprint=False),
            "finetuned": _source(ft, fingerprint=False),
            "filters": keep.describe(),
            "skipped_non_float": skipped,
            "filtered_out": filtered_out,
            "storage_dtype": STORAGE_NAMES[dtype],
        }
        if submodel:
            params["submodel"] = submodel
        if renames:
            params["renames"] = list(renames)
        if notes:
            params["notes"] = notes
        skipped_objects = sorted(
            {*getattr(base, "skipped_non_tensor", []), *getattr(ft, "skipped_non_tensor", [])}
        )
        if skipped_objects:
            params["skipped_non_tensor"] = skipped_objects
        acc = _Accum()
        if on_start:
            on_start(len(specs))
        last = specs[-1].name
        rows = {k: min(int(v["base_rows"]), int(v["finetuned_rows"]))
                for k, v in (resized or {}).items()}
        added = {str(v["added_rows"]): k for k, v in (resized or {}).items() if "added_rows" in v}
        if resized:
            params["resized"] = resized
        # the difference goes into two reused buffers in turn: the store writes (and hashes)
        # one behind our back while we fill the other (`ObjectWriter`, `WriteBehind`)
        size = max(_numel(s.shape) for s in specs)
        scratch = [torch.empty(size, dtype=torch.float32) for _ in range(2)]
        low = None if dtype == torch.float32 else [torch.empty(size, dtype=dtype) for _ in "ab"]
        turn = [0]

        reads = [s.name for s in specs if s.name not in added]  # in write order
        held: list[torch.Tensor] = []  # a resized fine-tune tensor, for its added rows

        def produce(spec: TensorSpec) -> torch.Tensor:
            turn[0] ^= 1
            n = _numel(spec.shape)
            d = scratch[turn[0]][:n].view(spec.shape)
            o = None if low is None else low[turn[0]][:n].view(spec.shape)
            if spec.name in added:  # rows only the fine-tune has: stored whole
                sq, err = _fused_diff(held.pop()[rows[added[spec.name]]:], None, d, o)
                ft_ahead.release()
            else:
                a, b = ft_ahead.take(), base_ahead.take()
                if spec.name in rows:  # the rows both vocabularies share
                    held.extend([a] if spec.name + ADDED in added else [])
                    a, b = a[: rows[spec.name]], b[: rows[spec.name]]
                sq, err = _fused_diff(a, b, d, o)
                base_ahead.release()
                if not held:
                    ft_ahead.release()
            out = d if o is None else o
            if not math.isfinite(sq):  # NaN/Inf, or squares past the fp32 range
                stored = d if o is None else o.to(torch.float32)
                sq = _slow_path(stored, d, spec.name, dtype, allow_nonfinite, acc)
                if o is not None:  # entries that are not finite are counted, not rounding errors
                    stored = torch.nan_to_num(stored, nan=0.0, posinf=0.0, neginf=0.0)
                    err = float(torch.nan_to_num((stored - d).abs_(), nan=0.0, posinf=0.0)
                                .masked_fill_(~torch.isfinite(o), 0.0).max())
            acc.max_round = max(acc.max_round, err)
            acc.sumsq += sq
            # the manifest is committed after the last tensor: keep its params current
            params.update(max_rounding_error=acc.max_round, nonfinite=acc.nonfinite,
                          l2=math.sqrt(acc.sumsq))
            if spec.name == last:  # every tensor read: the fingerprints cost no second pass
                params["base"]["fingerprint"] = base.fingerprint()
                params["finetuned"]["fingerprint"] = ft.fingerprint()
                params["base_fingerprint"] = params["base"]["fingerprint"]
                params["sources"] = [_pair(params)]
            if on_tensor:
                on_tensor(spec.name)
            return out

        # both inputs are read (and hashed) ahead on worker threads, one per input, into
        # reused buffers; the store writes the output on a third and hashes it on a fourth
        with ReadAhead(ft, reads) as ft_ahead, ReadAhead(base, reads) as base_ahead:
            manifest = write_tensor_object(
                store, "vector", specs, produce, params=params, created=created
            )
        for r in opened:
            cache.put(r)
    return stored_result(
        store, manifest, created, name, force, skipped, filtered_out, [_pair(params)]
    )


def stored_result(
    store: Store,
    manifest: Manifest,
    created: str,
    name: str | None,
    force: bool,
    skipped: list[str],
    filtered_out: int,
    sources: list[dict] | None = None,
) -> ExtractResult:
    """Tag the stored vector `name` (if given) and say whether it was already there; a vector
    already stored records the new `sources` it was made from."""
    deduplicated = manifest.created != created
    if deduplicated and sources:  # the same vector from other files (e.g. the same weights as .pt)
        manifest = store.add_sources(manifest.digest, sources)
    if name is not None:
        try:
            store.set_ref(name, manifest.digest, force=force)
        except TvtoolError as e:
            raise TvtoolError(
                f"vector stored as {manifest.digest[:12]}, but not named: {e}"
            ) from None
    return ExtractResult(manifest, name, deduplicated, skipped, filtered_out)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _pair(params: dict) -> dict[str, str]:
    b, f = params["base"], params["finetuned"]
    return {"base": b["path"], "base_format": b["format"], "finetuned": f["path"],
            "finetuned_format": f["format"], "finetuned_fingerprint": f["fingerprint"]}


FUSED = 1 << 18  # elements differenced, rounded and summed together (1 MB: in the cache, few calls)


def _fused_diff(
    a: torch.Tensor, b: torch.Tensor | None, d: torch.Tensor, o: torch.Tensor | None
) -> tuple[float, float]:
    """d = a - b in float32 (b None: d = a) and, with `o` (storage dtype), o = d rounded, slice
    by slice so that every slice is subtracted, rounded and summed while in the cache; returns
    (sum of squares of the stored values, largest |rounding error|). Not finite when any value
    (or a square) is not: the caller's slow path tells which."""
    fa, fd = a.reshape(-1), d.view(-1)
    fb = b.reshape(-1) if b is not None else None
    fo = o.view(-1) if o is not None else None
    sq, err = 0.0, 0.0
    back = torch.empty(min(FUSED, fd.numel()), dtype=torch.float32) if fo is not None else None
    for lo in range(0, fd.numel(), FUSED):
        x = fd[lo: lo + FUSED]
        xa = fa[lo: lo + FUSED].to(torch.float32)
        if fb is None:
            x.copy_(xa)
        else:
            torch.sub(xa, fb[lo: lo + FUSED].to(torch.float32), out=x)
        if fo is None:
            sq += float(torch.linalg.vector_norm(x)) ** 2
            continue
        y = fo[lo: lo + FUSED]
        y.copy_(x)
        s = back[: x.numel()].copy_(y)  # type: ignore[index]
        sq += float(torch.linalg.vector_norm(s)) ** 2
        err = max(err, float(s.sub_(x).abs_().max()))
    return sq, err


def _slow_path(
    stored: torch.Tensor, diff: torch.Tensor, key: str, dtype: torch.dtype, allow: bool,
    acc: _Accum,
) -> float:
    """The sum of squares of a tensor whose fp32 norm was not finite: refuse (or count) its
    non-finite entries, and sum the finite ones in float64 so that large values do not
    overflow."""
    _count_nonfinite(stored, diff, key, dtype, allow, acc)
    clean = torch.nan_to_num(stored, nan=0.0, posinf=0.0, neginf=0.0).to(torch.float64)
    return float(torch.dot(clean.reshape(-1), clean.reshape(-1)))


def _count_nonfinite(
    stored: torch.Tensor,
    diff: torch.Tensor,
    key: str,
    dtype: torch.dtype,
    allow: bool,
    acc: _Accum,
) -> None:
    bad = stored.numel() - int(torch.isfinite(stored).sum())
    if not bad:
        return
    if not allow:
        if bool(torch.isfinite(diff).all()):
            what = f"does not fit in {STORAGE_NAMES[dtype]}: {bad} value(s) overflow"
        else:
            what = f"has {bad} NaN/Inf value(s)"
        raise TvtoolError(
            f"the difference of tensor {key!r} {what}; nothing was stored "
            "(use --allow-nonfinite to store it anyway)"
        )
    acc.nonfinite += bad
