"""`store import`: all or nothing, and never more written than the bundle's manifests justify.

1. Validate, writing nothing: the index (names, namespaces, refs against this store), then
   every member in order: only the expected names, each once, a manifest (size-capped) before
   its data, the data's tar size equal to the manifest's `size`, the running total of new
   bytes within the free disk space, the data hashed to its digest and, for safetensors, its
   header checked against the manifest's claims; finally every input is in the bundle or here.
2. Stage the new objects into one directory under `tmp/` (one lock file held, not one open
   file per object), each re-hashed as it streams (the bundle may change between passes).
3. Commit under the store lock: place each object, then set every ref at once. A failure
   removes what this import placed; a crash leaves only unreferenced objects and a staging
   directory, both swept by `store gc`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.bundle import MAX_INDEX, parse_index
from tvtool.store.claims import claim_problems, entries_from_bytes, header_length
from tvtool.store.files import create_locked, lock_file
from tvtool.store.graph import edges
from tvtool.store.maintenance import STAGING_SUFFIX
from tvtool.store.manifest import Manifest
from tvtool.store.store import Store
from tvtool.store.tarstream import Member, TarFormatError, TarStream, open_stream
from tvtool.store.writer import place

MAX_MANIFEST = 16 << 20
CHUNK = 1 << 20


@dataclass
class Plan:
    refs: dict[str, str]
    objects: list[str]
    manifests: dict[str, Manifest] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)  # not in this store when validated


def import_bundle(store: Store, path: Path, *, force: bool = False) -> dict[str, Any]:
    """Copy a bundle's objects into the store, then set its refs: all or nothing."""
    store.init()
    plan = validate(store, path, force)
    staging = store.tmp_dir / f"{uuid.uuid4().hex}{STAGING_SUFFIX}"
    try:
        staging.mkdir()
        lock = create_locked(staging / "lock")  # gc leaves a locked staging directory alone
    except OSError as e:
        raise TvtoolError(f"cannot import into {store.root}: {e.strerror or e}") from None
    try:
        with lock:
            staged = _stage(store, path, plan, staging)
            new = _commit(store, plan, staging, staged, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"objects": plan.objects, "new": new, "refs": plan.refs}


def _where(path: Path) -> str:
    return f"bundle {path}"


def validate(store: Store, path: Path, force: bool) -> Plan:
    """Pass 1: check everything that can be checked, reading the bundle once, writing nothing."""
    try:
        f = open_stream(path)
    except OSError as e:
        raise TvtoolError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        tar = TarStream(f, str(path))
        members = tar.members()
        try:
            first = next(members, None)
        except TarFormatError:
            raise TvtoolError(f"{path} is not a tvtool bundle (not a tar file)") from None
        if first is None or first.name != "bundle.json":
            raise TvtoolError(f"{path} is not a tvtool bundle (no bundle.json first)")
        if first.size > MAX_INDEX:
            raise IntegrityError(f"{_where(path)}: bundle.json of {first.size} bytes")
        plan = Plan(*parse_index(tar.read(first.size), path))
        _check_refs(store, plan, force, path)
        expected = {f"objects/{d}.json": d for d in plan.objects}
        expected |= {f"objects/{d}": d for d in plan.objects}
        seen: set[str] = set()
        free, declared = shutil.disk_usage(store.tmp_dir).free, 0
        for m in members:
            d = expected.get(m.name)
            if d is None or m.name in seen:
                what = "a second" if m.name in seen else "an unexpected"
                raise IntegrityError(f"{_where(path)} has {what} member {m.name[:100]!r}")
            seen.add(m.name)
            if m.name.endswith(".json"):
                plan.manifests[d] = _read_manifest(tar, m, d, path)
                if not store.has(d):
                    plan.new.append(d)
                    declared += plan.manifests[d].size
                    if declared > free:
                        raise TvtoolError(
                            f"{_where(path)} needs more than {declared} bytes for new objects;"
                            f" {free} are free in {store.root}; nothing imported"
                        )
            else:
                manifest = _declared(plan, d, m, path)
                _check_data(tar, manifest, path)
        lacking = sorted(set(expected) - seen)
        if lacking:
            raise IntegrityError(f"{_where(path)} lacks {lacking[0]}; nothing imported")
    for d, manifest in plan.manifests.items():
        for e in edges(manifest):
            if e not in plan.manifests and not store.has(e):
                raise IntegrityError(
                    f"{_where(path)}: object {d[:12]} needs {e[:12]}, which neither the bundle"
                    " nor this store holds; nothing imported"
                )
    return plan


def _check_refs(store: Store, plan: Plan, force: bool, path: Path) -> None:
    held = set(plan.objects)
    for name, digest in plan.refs.items():
        if digest not in held and not store.has(digest):
            raise IntegrityError(f"{_where(path)}: ref {name!r} names an object it does not hold")
        old = store.get_ref(name)
        if old is not None and old != digest and not force:
            raise TvtoolError(
                f"ref {name!r} already points at {old[:12]} here, the bundle has {digest[:12]};"
                " use --force to move it (nothing imported)"
            )
        try:
            store._check_free(name, store.refs_dir / name)
        except TvtoolError as e:
            raise TvtoolError(f"{e} (nothing imported)") from None


def _read_manifest(tar: TarStream, m: Member, digest: str, path: Path) -> Manifest:
    if m.size > MAX_MANIFEST:
        raise IntegrityError(f"{_where(path)}: manifest of {digest[:12]} has {m.size} bytes")
    try:
        manifest = Manifest.model_validate_json(tar.read(m.size))
    except ValueError:
        raise IntegrityError(f"{_where(path)}: manifest of {digest[:12]} is corrupt") from None
    if manifest.digest != digest or manifest.size < 0:
        raise IntegrityError(f"{_where(path)}: manifest of {digest[:12]} names another object")
    return manifest


def _declared(plan: Plan, digest: str, m: Member, path: Path) -> Manifest:
    manifest = plan.manifests.get(digest)
    if manifest is None:
        raise IntegrityError(f"{_where(path)}: the data of {digest[:12]} comes before its"
                             " manifest")
    if m.size != manifest.size:
        raise IntegrityError(
            f"{_where(path)}: object {digest[:12]} has {m.size} bytes of data, its manifest"
            f" {manifest.size}; nothing imported"
        )
    return manifest


def _check_data(tar: TarStream, manifest: Manifest, path: Path) -> None:
    """Hash the data as it streams; a safetensors header is held (capped) and checked."""
    d = manifest.digest
    h, head = hashlib.sha256(), bytearray()
    need = 8 if manifest.format == "safetensors" else 0
    try:
        while chunk := tar.read(CHUNK):
            h.update(chunk)
            pos = 0
            while len(head) < need and pos < len(chunk):
                take = chunk[pos : pos + need - len(head)]
                head += take
                pos += len(take)
                if need == 8 and len(head) == 8:  # at most MAX_HEADER more
                    need = 8 + header_length(bytes(head), manifest.size)
        if h.hexdigest() != d:
            raise IntegrityError(
                f"{_where(path)}: object {d[:12]} is corrupt (its data hashes to"
                f" {h.hexdigest()[:12]}); nothing imported"
            )
        if need:
            problems = claim_problems(manifest, entries_from_bytes(bytes(head), manifest.size,
                                                                   d[:12]))
            if problems:
                raise IntegrityError(
                    f"{_where(path)}: object {d[:12]}: {problems[0]}; nothing imported"
                )
    except IntegrityError:
        raise
    except TvtoolError as e:
        raise IntegrityError(f"{_where(path)}: object {d[:12]}: {e}; nothing imported") from None


def _stage(store: Store, path: Path, plan: Plan, staging: Path) -> list[str]:
    """Pass 2: stream the new objects' data into `staging`, re-hashed."""
    wanted = {f"objects/{d}": d for d in plan.new}
    staged: list[str] = []
    with open_stream(path) as f:
        tar = TarStream(f, str(path))
        for m in tar.members():
            d = wanted.pop(m.name, None)
            if d is None:
                continue
            if m.size != plan.manifests[d].size:
                raise IntegrityError(f"{_where(path)} changed while importing; nothing imported")
            h = hashlib.sha256()
            try:
                with open(staging / d, "xb") as out:
                    while chunk := tar.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as e:
                raise TvtoolError(f"cannot import {path}: {e.strerror or e}; nothing imported"
                                  ) from None
            if h.hexdigest() != d:
                raise IntegrityError(f"{_where(path)} changed while importing; nothing imported")
            staged.append(d)
    if wanted:
        raise IntegrityError(f"{_where(path)} changed while importing; nothing imported")
    return staged


def _commit(
    store: Store, plan: Plan, staging: Path, staged: list[str], force: bool
) -> list[str]:
    """Place the staged objects and set the refs under the store lock; undo on failure."""
    placed: list[tuple[str, int, bool]] = []
    with store.lock():
        try:
            for d in staged:
                if store.has(d):  # written by someone else meanwhile
                    continue
                _, moved = place(store, staging / d, plan.manifests[d])
                placed.append((d, store.manifest_path(d).stat().st_mtime_ns, moved))
            store.set_refs_locked(plan.refs, force=force)
        except OSError as e:
            _unplace(store, placed)
            raise TvtoolError(f"cannot import: {e.strerror or e}; nothing imported") from None
        except BaseException:
            _unplace(store, placed)
            raise
    return [d for d, _, _ in placed]


def _unplace(store: Store, placed: list[tuple[str, int, bool]]) -> None:
    """Remove objects this import placed (their data only if it moved it there), unless
    another writer has used them since."""
    for d, mtime_ns, moved in reversed(placed):
        blob, mpath = store.blob_path(d), store.manifest_path(d)
        try:
            f = open(blob, "rb")  # noqa: SIM115
        except FileNotFoundError:
            continue
        with f:
            if not lock_file(f, exclusive=True, blocking=False):
                continue
            try:
                if mpath.stat().st_mtime_ns != mtime_ns:
                    continue
            except FileNotFoundError:
                pass
            mpath.unlink(missing_ok=True)
            if moved:
                blob.unlink(missing_ok=True)
