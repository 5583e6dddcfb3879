"""The reports of the store commands, `extract`, `clean` and `datasets ls`: what `--json` prints
(`Report.doc()`) and the human views read. Field names are the documents' keys. Torch-free."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from tvtool.request import Report
from tvtool.store.manifest import Manifest


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectRow(_Part):
    """One stored object as `store ls` lists it (kind `corrupt`: its manifest is unreadable)."""

    names: list[str]
    digest: str
    kind: str
    numel: int | None
    size: int | None
    dtype: str | None
    created: str | None
    tensors: int | None


class _Stored(Report, Manifest):
    """An object's manifest fields, flat in the document, and what the command adds."""


class ShownObject(_Stored):
    """`store show`: the manifest and the object's ref names."""

    names: list[str]


class Extracted(_Stored):
    """`extract`: the stored vector's manifest, its ref name, and whether the store held it."""

    name: str | None
    deduplicated: bool


class StoreListing(Report):
    store: str
    objects: list[ObjectRow]
    dangling_refs: dict[str, str]  # ref -> the digest it holds, which the store lacks


class ProblemRow(_Part):
    digest: str
    names: list[str]
    problem: str
    dangling_ref: str | None


class VerifyReport(Report):
    store: str
    checked: int
    ok: bool
    problems: list[ProblemRow]
    warnings: list[ProblemRow]


class GcReport(Report):
    store: str
    dry_run: bool
    grace_seconds: float
    removed: list[str]
    reclaimed_bytes: int
    kept_recent: list[str]
    kept_damaged: list[str]  # reached by a ref, manifest missing or corrupt
    corrupt_refs: list[str]  # refs that hold no digest
    tmp_removed: int


class CleanReport(Report):
    dry_run: bool
    grace_seconds: float
    removed: list[str]
    bytes: int
    kept_recent: list[str]


class ExportReport(Report):
    bundle: str
    format: int
    refs: dict[str, str]
    objects: list[str]
    size: int


class ImportReport(Report):
    objects: list[str]
    new: list[str]  # the objects this store did not hold yet
    refs: dict[str, str]


class DatasetRow(_Part):
    name: str
    title: str
    classes: int | None  # None: the class names come from the data
    templates: int
    suites: list[str]
    variants: list[str]


class DatasetsReport(Report):
    suites: dict[str, str]
    datasets: list[DatasetRow]
