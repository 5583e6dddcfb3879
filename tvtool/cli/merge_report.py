"""The reports of `merge` (a plan, and what was written) and `merge provenance`: what `--json`
prints (`Report.doc()`) and the human view reads. Field names are the documents' keys."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from tvtool.request import Report


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeBase(_Part):
    path: str
    fingerprint: str | None


class MergeTerm(_Part):
    """One term: a stored vector (or a checkpoint), its weight and mask, what it covers."""

    term: str
    vector: str | None
    name: str
    checkpoint: str | None
    fingerprint: str | None
    weight: float
    mask: str | None
    tensors: int
    numel: int
    extracted_from: str | None


class TensorCounts(_Part):
    total: int
    touched: int  # changed by the merge
    copied: int  # the base's, unchanged


class MergeReport(Report):
    """The merge (digest `merge` of its recipe), its terms and output; `seconds` once written."""

    dry_run: bool
    merge: str
    base: MergeBase
    method: str
    params: dict[str, Any]
    name: str | None
    terms: list[MergeTerm]
    coefs: str | None
    tensors: TensorCounts
    files: list[str]
    index: str | None
    size: int
    skipped: list[str]
    resized: dict[str, list[int]]  # vocabulary resizes: written key -> [base rows, rows]
    seconds: float | None = None


class ProvenanceReport(Report):
    path: str
    tvtool: bool  # whether tvtool merge wrote the file
    provenance: dict[str, Any] | None
    metadata: dict[str, Any]


def merge_report(st: Any, plan: Any, seconds: float | None = None) -> MergeReport:
    """The report of a merge `plan` (`seconds`: how long writing it took; None: a dry run)."""
    timing = {"seconds": round(seconds, 3)} if seconds is not None else {}
    return MergeReport(
        dry_run=seconds is None,
        merge=plan.digest,
        base=MergeBase(path=str(plan.request.base), fingerprint=plan.recipe.base),
        method=plan.params.method,
        params=plan.recipe.params(),
        name=plan.request.name,
        terms=[
            MergeTerm(
                term=t.label, vector=t.digest,
                name=st.display_name(t.digest) if t.digest else str(t.checkpoint),
                checkpoint=str(t.checkpoint) if t.checkpoint else None,
                fingerprint=t.fingerprint, weight=t.weight, mask=t.mask, tensors=len(t.keys),
                numel=t.numel, extracted_from=t.extracted_from,
            )
            for t in plan.terms
        ],
        coefs=plan.coefs,
        tensors=TensorCounts(total=len(plan.specs), touched=len(plan.touched),
                             copied=len(plan.specs) - len(plan.touched)),
        files=[str(f) for f, _ in plan.files],
        index=str(plan.index) if plan.index else None,
        size=plan.total_size,
        skipped=plan.skipped,
        resized={k: [g.base_rows, g.rows] for k, g in plan.grown.items()},
        **timing,
    )
