"""`verify` (re-hash every object) and `gc` (sweep what nothing reaches). Torch-free."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tvtool.errors import TvtoolError
from tvtool.store.files import lock_file
from tvtool.store.manifest import Manifest
from tvtool.store.store import Store

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
    ref: str | None = None  # set for a ref that points at a missing object


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(
    store: Store, on_object: Callable[[str], None] | None = None
) -> tuple[int, list[Problem]]:
    """Re-hash every object; returns (objects checked, problems). Dangling refs are problems
    too. `on_object(digest)` is called after each object (for progress)."""
    problems: list[Problem] = []
    checked = 0
    for digest in list(store.iter_digests()):
        checked += 1
        problems.extend(_check_object(store, digest))
        if on_object is not None:
            on_object(digest)
    for name, digest in store.refs().items():
        if not store.has(digest):
            problems.append(Problem(digest, f"ref {name!r} points at a missing object", name))
    return checked, problems


def _check_object(store: Store, digest: str) -> list[Problem]:
    try:
        manifest = Manifest.model_validate_json(store.manifest_path(digest).read_bytes())
    except (OSError, ValueError):
        return [Problem(digest, "manifest unreadable or invalid")]
    out = []
    if manifest.digest != digest:
        out.append(Problem(digest, f"manifest names another digest ({manifest.digest[:12]})"))
    blob = store.blob_path(digest)
    try:
        actual = hash_file(blob)
    except FileNotFoundError:
        return [*out, Problem(digest, "data blob missing")]
    except OSError as e:
        return [*out, Problem(digest, f"data blob unreadable ({e.strerror})")]
    if actual != digest:
        out.append(Problem(digest, f"content hashes to {actual[:12]}"))
    elif blob.stat().st_size != manifest.size:
        out.append(Problem(digest, "size differs from manifest"))
    return out


def closure(store: Store, roots: Iterable[str]) -> set[str]:
    """The given objects and, transitively, every input their manifests name (that exist)."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        d = stack.pop()
        if d in seen or not store.has(d):
            continue
        seen.add(d)
        try:
            stack.extend(store.manifest(d).inputs)
        except TvtoolError:  # a corrupt manifest still keeps its own object
            pass
    return seen


def reachable(store: Store) -> set[str]:
    """Digests reached from refs, following manifests' `inputs`."""
    return closure(store, store.refs().values())


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    reclaimed_bytes: int = 0
    tmp_removed: int = 0
    dry_run: bool = False


def gc(store: Store, grace_seconds: float, dry_run: bool = False) -> GcReport:
    """Remove objects no ref reaches, orphan blobs (a write that crashed before its manifest)
    and stale temp files, when older than the grace period.

    Unreferenced objects younger than the grace period are kept together with their inputs
    (a fresh merge result that is about to be tagged keeps the vectors it was made from).
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
        referenced = reachable(store)
        keep = referenced | closure(store, recent)
        report.kept_recent = sorted(set(recent) - referenced)
        for digest in digests:
            if digest not in keep and _sweep_object(store, digest, cutoff, report, dry_run):
                report.removed.append(digest)
        for blob in _orphan_blobs(store):  # data whose manifest never got written
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
    if store.tmp_dir.exists():
        out += sorted(p for p in store.tmp_dir.iterdir() if p.is_file())
    if store.refs_dir.exists():
        out += sorted(p for p in store.refs_dir.rglob(".*.tmp") if p.is_file())
    return out


def _sweep_file(path: Path, dry_run: bool) -> bool:
    """Remove a file unless someone holds its lock (a write in flight)."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
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
    """Refs that point at objects the store does not hold."""
    return {n: d for n, d in store.refs().items() if not store.has(d)}
