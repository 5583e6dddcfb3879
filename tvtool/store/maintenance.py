"""`verify` (re-hash every object) and `gc` (sweep what no ref reaches). Torch-free."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from tvtool.store.manifest import Manifest
from tvtool.store.store import Store


@dataclass
class Problem:
    digest: str
    what: str


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(store: Store) -> tuple[int, list[Problem]]:
    """Re-hash every object; returns (objects checked, problems). Dangling refs are problems too."""
    problems: list[Problem] = []
    checked = 0
    for digest in store.iter_digests():
        checked += 1
        try:
            manifest = Manifest.model_validate_json(store.manifest_path(digest).read_bytes())
        except (OSError, ValueError):
            problems.append(Problem(digest, "manifest unreadable or invalid"))
            continue
        if manifest.digest != digest:
            problems.append(Problem(digest, f"manifest names another digest ({manifest.digest[:12]})"))
        blob = store.blob_path(digest)
        if not blob.exists():
            problems.append(Problem(digest, "data blob missing"))
            continue
        actual = hash_file(blob)
        if actual != digest:
            problems.append(Problem(digest, f"content hashes to {actual[:12]}"))
        elif blob.stat().st_size != manifest.size:
            problems.append(Problem(digest, "size differs from manifest"))
    for name, digest in store.refs().items():
        if not store.has(digest):
            problems.append(Problem(digest, f"ref {name!r} points at a missing object"))
    return checked, problems


def reachable(store: Store) -> set[str]:
    """Digests reached from refs, following manifests' `inputs`."""
    seen: set[str] = set()
    stack = [d for d in store.refs().values()]
    while stack:
        d = stack.pop()
        if d in seen or not store.has(d):
            continue
        seen.add(d)
        try:
            stack.extend(store.manifest(d).inputs)
        except Exception:  # a corrupt manifest still keeps its own object
            pass
    return seen


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    reclaimed_bytes: int = 0
    tmp_removed: int = 0


def gc(store: Store, grace_seconds: float, dry_run: bool = False) -> GcReport:
    """Remove objects no ref reaches whose manifests are older than the grace period,
    orphan blobs (a write that crashed before its manifest) and stale temp files."""
    report = GcReport()
    if not store.exists():
        return report
    keep = reachable(store)
    cutoff = time.time() - grace_seconds
    for fan in sorted(p for p in store.objects_dir.iterdir() if p.is_dir()):
        for path in sorted(fan.iterdir()):
            if path.name.endswith(".json"):
                continue
            digest = fan.name + path.name
            if digest in keep:
                continue
            mpath = store.manifest_path(digest)
            stamp = (mpath if mpath.exists() else path).stat().st_mtime
            if stamp > cutoff:
                report.kept_recent.append(digest)
                continue
            report.removed.append(digest)
            report.reclaimed_bytes += path.stat().st_size
            if not dry_run:
                mpath.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        for mpath in sorted(fan.glob("*.json")):  # manifests whose blob is gone
            digest = fan.name + mpath.name[:-5]
            if digest not in keep and not store.blob_path(digest).exists():
                if mpath.stat().st_mtime <= cutoff:
                    report.removed.append(digest)
                    if not dry_run:
                        mpath.unlink(missing_ok=True)
    if store.tmp_dir.exists():
        for path in store.tmp_dir.iterdir():
            if path.stat().st_mtime <= cutoff:
                report.tmp_removed += 1
                if not dry_run:
                    path.unlink(missing_ok=True)
    return report
