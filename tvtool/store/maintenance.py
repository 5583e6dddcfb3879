"""`verify` (check every object and ref) and `gc` (sweep what nothing reaches). Torch-free."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tvtool.checkpoints.header import file_sha256
from tvtool.errors import TvtoolError
from tvtool.store.claims import claim_problems, entries_from_file
from tvtool.store.files import lock_file
from tvtool.store.graph import closure, edges, from_refs
from tvtool.store.manifest import Manifest
from tvtool.store.names import is_digest, ref_name_problem
from tvtool.store.store import Store

STAGING_SUFFIX = ".import"  # `store import` stages into tmp/<uuid>.import/ (bundle_import)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'30s', '10m', '1h', '2d', '1w', '1h30m' or plain seconds ('0', '90') -> seconds."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m or (m.group(2) == "" and (pos != 0 or m.end() != len(s))):
            raise TvtoolError(f"invalid duration {text!r}: use e.g. 30s, 10m, 1h, 2d or 0")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not s:
        raise TvtoolError("empty duration: use e.g. 30s, 10m, 1h, 2d or 0")
    return total


def format_duration(seconds: float) -> str:
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


@dataclass
class Problem:
    digest: str
    what: str
    ref: str | None = None  # set for a problem of a ref (dangling, corrupt, or a warning)


def verify(
    store: Store,
    on_object: Callable[[str], None] | None = None,
    warnings: list[Problem] | None = None,
) -> tuple[int, list[Problem]]:
    """Check every object and ref; returns (objects checked, problems).

    Problems (integrity failures): a manifest that is unreadable, names another digest or
    claims other tensors, shapes, dtypes or numel than the data holds; data that is missing,
    unreadable or hashes to another digest; an input (or coefs vector) that is missing; data
    without a manifest that a ref or another object reaches; a ref that holds no digest or
    points at a missing object. Warnings (appended to `warnings`): data without a manifest
    that nothing reaches (an interrupted write, swept by gc) and refs made by older versions
    under names that can no longer be created. `on_object(digest)` reports progress.
    """
    problems: list[Problem] = []
    notes: list[Problem] = [] if warnings is None else warnings
    checked = 0
    named: set[str] = set()
    for digest in list(store.iter_digests()):
        checked += 1
        problems.extend(_check_object(store, digest, named))
        if on_object is not None:
            on_object(digest)
    refs = store.refs()
    reached = set(from_refs(store).order) | named
    for blob in _orphan_blobs(store):
        digest = blob.parent.name + blob.name
        if digest in reached:
            problems.append(Problem(digest, "manifest missing (its data is kept: it is reached)"))
        elif is_digest(digest):
            notes.append(Problem(digest, "data without a manifest (an interrupted write;"
                                         " `tvtool store gc` sweeps it)"))
    for name, target in refs.items():
        if not is_digest(target):
            problems.append(Problem(target[:64] or "-", f"ref {name!r} holds no digest", name))
        elif not store.has(target) and not store.blob_path(target).exists():
            problems.append(Problem(target, f"ref {name!r} points at a missing object", name))
        why = ref_name_problem(name)
        if why is not None:
            notes.append(Problem(target[:64], f"ref {name!r} has a name tvtool no longer"
                                 f" creates ({why}); rename it with `tvtool store tag` and"
                                 " `tvtool store rm`", name))
    return checked, problems


def _check_object(store: Store, digest: str, named: set[str]) -> list[Problem]:
    try:
        manifest = Manifest.model_validate_json(store.manifest_path(digest).read_bytes())
    except (OSError, ValueError):
        return [Problem(digest, "manifest unreadable or invalid")]
    out = []
    if manifest.digest != digest:
        out.append(Problem(digest, f"manifest names another digest ({manifest.digest[:12]})"))
    for e in edges(manifest):
        named.add(e)
        if not store.has(e) and not store.blob_path(e).exists():
            out.append(Problem(digest, f"input {e[:12]} is missing"))
    blob = store.blob_path(digest)
    try:
        actual = file_sha256(blob)
    except FileNotFoundError:
        return [*out, Problem(digest, "data blob missing")]
    except OSError as e:
        return [*out, Problem(digest, f"data blob unreadable ({e.strerror})")]
    if actual != digest:
        out.append(Problem(digest, f"content hashes to {actual[:12]}"))
    elif blob.stat().st_size != manifest.size:
        out.append(Problem(digest, "size differs from manifest"))
    elif manifest.format == "safetensors":
        try:
            entries = entries_from_file(blob)
        except (OSError, TvtoolError) as e:
            return [*out, Problem(digest, f"data is not valid safetensors ({e})")]
        out += [Problem(digest, what) for what in claim_problems(manifest, entries)]
    return out


def reachable(store: Store) -> set[str]:
    """Digests reached from refs, following manifests' inputs (present objects only)."""
    return set(from_refs(store).order)


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    kept_damaged: list[str] = field(default_factory=list)  # reached, manifest missing/corrupt
    corrupt_refs: list[str] = field(default_factory=list)  # refs that hold no digest
    reclaimed_bytes: int = 0
    tmp_removed: int = 0
    dry_run: bool = False


def gc(store: Store, grace_seconds: float, dry_run: bool = False) -> GcReport:
    """Remove objects no ref reaches, orphan blobs (a write that crashed before its manifest)
    and stale temp files, when older than the grace period.

    Unreferenced objects younger than the grace period are kept together with their inputs
    (a fresh merge result that is about to be tagged keeps the vectors it was made from).
    Refs are the roots and reachability never trusts a manifest to exist: when a ref reaches
    an object whose manifest is missing or corrupt, its inputs are unknown, so no object is
    swept at all (only temp files) and the object is reported in `kept_damaged`; the same
    holds while a ref is corrupt (it holds no digest: `corrupt_refs`).
    Files a live writer holds locked are never touched. Runs under the store lock, so a
    concurrent `tag` either lands before the sweep (and is honoured) or fails cleanly after.
    """
    report = GcReport(dry_run=dry_run)
    if not store.exists():
        return report
    cutoff = time.time() - grace_seconds
    with store.lock():
        digests = list(store.iter_digests())
        recent = [d for d in digests if _mtime(store.manifest_path(d)) > cutoff]
        reach = from_refs(store)
        referenced = set(reach.order)
        keep = referenced | set(closure(store, recent))
        report.kept_recent = sorted(set(recent) - referenced)
        report.kept_damaged = sorted(reach.damaged)
        report.corrupt_refs = [n for n, d in store.refs().items() if not is_digest(d)]
        blocked = bool(reach.damaged or report.corrupt_refs)
        if blocked:  # some roots' reach is unknown: sweeping anything could lose data
            digests = []
        for digest in digests:
            if digest not in keep and _sweep_object(store, digest, cutoff, report, dry_run):
                report.removed.append(digest)
        for blob in _orphan_blobs(store):  # data whose manifest never got written
            if blocked or blob.parent.name + blob.name in keep:  # ...or was lost
                continue
            size = _size(blob)
            if _mtime(blob) <= cutoff and _sweep_file(blob, dry_run):
                report.removed.append(blob.parent.name + blob.name)
                report.reclaimed_bytes += size
        for path in _stale_temp_files(store):
            if _mtime(path) <= cutoff and _sweep_file(path, dry_run):
                report.tmp_removed += 1
    return report


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # vanished meanwhile: never "old"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sweep_object(
    store: Store, digest: str, cutoff: float, report: GcReport, dry_run: bool
) -> bool:
    """Remove one object under its blob's lock (a writer deduplicating onto it holds a shared
    lock, and refreshes the manifest's mtime, which is checked again once the lock is ours)."""
    blob, mpath = store.blob_path(digest), store.manifest_path(digest)
    try:
        f = open(blob, "rb")  # noqa: SIM115
    except FileNotFoundError:  # manifest without data: only the manifest is left to sweep
        if not dry_run:
            mpath.unlink(missing_ok=True)
        return True
    with f:
        if not lock_file(f, exclusive=True, blocking=False):
            return False
        if _mtime(mpath) > cutoff:  # written again meanwhile
            return False
        size = os.fstat(f.fileno()).st_size
        if not dry_run:
            mpath.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
    report.reclaimed_bytes += size
    return True


def _orphan_blobs(store: Store) -> list[Path]:
    out = []
    if not store.objects_dir.exists():
        return out
    for fan in sorted(p for p in store.objects_dir.iterdir() if p.is_dir()):
        for path in sorted(fan.iterdir()):
            if not path.name.endswith(".json") and not store.has(fan.name + path.name):
                out.append(path)
    return out


def _stale_temp_files(store: Store) -> list[Path]:
    """Temp files of object writes, and leftovers of ref writes (we hold the store lock)."""
    out = []
    if store.tmp_dir.exists():  # files, and import staging directories (other directories,
        # such as compose's resumable runs in tmp/compose-runs, belong to their commands)
        out += sorted(p for p in store.tmp_dir.iterdir()
                      if p.is_file() or p.name.endswith(STAGING_SUFFIX))
    if store.refs_dir.exists():
        out += sorted(p for p in store.refs_dir.rglob(".*.tmp") if p.is_file())
    return out


def _sweep_file(path: Path, dry_run: bool) -> bool:
    """Remove a file unless someone holds its lock (a write in flight); a directory (an
    import's staging area) unless its `lock` file is held, or it has none and is young."""
    if path.is_dir() and not path.is_symlink():
        lock = path / "lock"
        if lock.exists():
            if not _sweep_file(lock, dry_run=True):
                return False
        elif _mtime(path) > time.time() - 60:  # being set up right now
            return False
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        f = open(path, "rb")  # noqa: SIM115
    except (FileNotFoundError, IsADirectoryError):
        return False
    with f:
        if not lock_file(f, exclusive=True, blocking=False):
            return False
        if not dry_run:
            path.unlink(missing_ok=True)
    return True


def list_objects(store: Store, kind: str | None = None, *, caches: bool = True) -> list[dict]:
    """One summary per object (names, digest, kind, numel, size, dtype, created, tensors):
    named objects first by name, then untagged ones by creation time. A corrupt manifest
    lists as kind 'corrupt'. `caches=False` leaves out cached zero-shot heads."""
    by_digest = store.names_by_digest()
    rows = []
    for digest in store.iter_digests():
        row: dict = {"names": by_digest.get(digest, []), "digest": digest, "kind": "corrupt",
                     "numel": None, "size": None, "dtype": None, "created": None,
                     "tensors": None}
        try:
            m = store.manifest(digest)
            row.update(kind=m.kind, numel=m.numel, size=m.size, dtype=m.dtype,
                       created=m.created, tensors=len(m.tensors))
        except TvtoolError:
            pass
        if not caches and kind is None and row["kind"] == "head":
            continue
        if kind is None or row["kind"] == kind:
            rows.append(row)
    rows.sort(key=lambda r: (not r["names"], r["names"][:1], r["created"] or "", r["digest"]))
    return rows


def dangling_refs(store: Store) -> dict[str, str]:
    """Refs that point at objects the store does not hold (or hold no digest)."""
    return {n: d for n, d in store.refs().items() if not is_digest(d) or not store.has(d)}
