"""Self-contained bundles (a plain tar) for moving objects and their names between stores.

Layout: `bundle.json` (format, refs, object digests in order), then for each object
`objects/<digest>.json` (its manifest) and `objects/<digest>` (its data). Import never extracts
to disk: it streams each member into the store's writer, so member names cannot escape.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import uuid
from pathlib import Path
from typing import Any

from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.graph import walk
from tvtool.store.manifest import Manifest, canonical_json
from tvtool.store.store import ObjectWriter, Store, is_valid_ref_name

BUNDLE_FORMAT = 1
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def expand_names(store: Store, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Names to export -> (refs that travel with the bundle, root digests).

    A ref name exports that ref; a namespace (`vit-b-32` or `vit-b-32/`) exports every ref
    under it; a digest or prefix exports the object without a name.
    """
    refs: dict[str, str] = {}
    roots: list[str] = []
    all_refs = store.refs()
    for name in names:
        ns = name.rstrip("/")
        under = {n: d for n, d in all_refs.items() if n.startswith(ns + "/")}
        if name in all_refs:
            refs[name] = all_refs[name]
            roots.append(all_refs[name])
        elif under and (name.endswith("/") or store.get_ref(ns) is None):
            refs.update(under)
            roots.extend(under.values())
        else:
            roots.append(store.resolve(name))
    return dict(sorted(refs.items())), list(dict.fromkeys(roots))


def export_bundle(store: Store, names: list[str], out: Path, *, force: bool = False) -> dict:
    """Write the named objects (with their refs) and all their inputs to `out`, atomically."""
    if out.exists() and not force:
        raise TvtoolError(f"{out} exists; use --force to overwrite it")
    if out.is_dir():
        raise TvtoolError(f"{out} is a directory")
    refs, roots = expand_names(store, names)
    reach = walk(store, ((d, "given") for d in roots))
    bad = [*reach.damaged, *reach.missing]
    if bad:
        raise IntegrityError(
            f"cannot export: object {bad[0][:12]} is damaged or missing"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; run `tvtool store verify`"
        )
    objects = reach.order
    index = {"format": BUNDLE_FORMAT, "refs": refs, "objects": objects}
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                _add_bytes(tar, "bundle.json", canonical_json(index))
                for d in objects:
                    tar.add(store.manifest_path(d), arcname=f"objects/{d}.json")
                    tar.add(store.blob_path(d), arcname=f"objects/{d}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**index, "size": out.stat().st_size}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def read_index(tar: tarfile.TarFile, path: Path) -> tuple[dict[str, str], list[str]]:
    """Validated (refs, object digests) from a bundle's `bundle.json`."""
    try:
        index = json.loads(_member(tar, "bundle.json", path, integrity=False))
    except ValueError:
        raise TvtoolError(f"{path} is not a tvtool bundle (bundle.json is not JSON)") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        fmt = index.get("format") if isinstance(index, dict) else None
        raise TvtoolError(f"{path}: unsupported bundle format {fmt!r}")
    objects, refs = index.get("objects"), index.get("refs", {})
    if not isinstance(objects, list) or not all(
        isinstance(d, str) and _DIGEST.match(d) for d in objects
    ):
        raise IntegrityError(f"bundle {path}: malformed object list")
    if not isinstance(refs, dict) or not all(
        isinstance(n, str) and is_valid_ref_name(n) and isinstance(d, str) and _DIGEST.match(d)
        for n, d in refs.items()
    ):
        raise IntegrityError(f"bundle {path}: malformed refs")
    return refs, list(dict.fromkeys(objects))


def _member(tar: tarfile.TarFile, name: str, path: Path, *, integrity: bool = True) -> bytes:
    try:
        f = tar.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        what = "is not a tvtool bundle (no bundle.json)" if not integrity else f"lacks {name}"
        raise (IntegrityError if integrity else TvtoolError)(f"{path} {what}")
    return f.read()


def import_bundle(store: Store, path: Path, *, force: bool = False) -> dict[str, Any]:
    """Copy a bundle's objects into the store, then set its refs.

    Every object is hashed while it streams into a temp file; only when all of them check out
    (and no ref would be moved without `force`) is anything committed, so a corrupt bundle
    imports nothing. Objects the store already holds are verified and kept as they are.
    """
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise TvtoolError(f"{path} is not a tvtool bundle: {e}") from None
    pending: list[tuple[ObjectWriter, dict[str, Any]]] = []
    try:
        with tar:
            refs, objects = read_index(tar, path)
            _check_refs(store, refs, objects, force, path)
            for digest in objects:
                pending.append(_stage(store, tar, digest, path))
        new = [w.digest for w, _ in pending if not store.has(w.digest)]
        for w, fields in pending:
            w.commit(fields)
        pending = []
    except tarfile.TarError as e:
        raise IntegrityError(f"bundle {path} is damaged ({e}); nothing imported") from None
    finally:
        for w, _ in pending:
            w.abort()
    for name, digest in refs.items():
        store.set_ref(name, digest, force=force)
    return {"objects": objects, "new": new, "refs": refs}


def _check_refs(
    store: Store, refs: dict[str, str], objects: list[str], force: bool, path: Path
) -> None:
    for name, digest in refs.items():
        if digest not in objects and not store.has(digest):
            raise IntegrityError(f"bundle {path}: ref {name!r} names an object it does not hold")
        old = store.get_ref(name)
        if old is not None and old != digest and not force:
            raise TvtoolError(
                f"ref {name!r} already points at {old[:12]} here, the bundle has {digest[:12]};"
                " use --force to move it (nothing imported)"
            )


def _stage(
    store: Store, tar: tarfile.TarFile, digest: str, path: Path
) -> tuple[ObjectWriter, dict[str, Any]]:
    """Stream one object into a temp file and check it; returns the writer, not committed."""
    try:
        manifest = Manifest.model_validate_json(_member(tar, f"objects/{digest}.json", path))
    except ValueError:
        raise IntegrityError(f"bundle {path}: manifest of {digest[:12]} is corrupt") from None
    if manifest.digest != digest:
        raise IntegrityError(f"bundle {path}: manifest of {digest[:12]} names another digest")
    try:
        blob = tar.extractfile(f"objects/{digest}")
    except KeyError:
        blob = None
    if blob is None:
        raise IntegrityError(f"bundle {path} lacks the data of {digest[:12]}")
    w = store.writer()
    try:
        while chunk := blob.read(1 << 20):
            w.write(chunk)
        w.finish()
        if w.digest != digest or w.size != manifest.size:
            raise IntegrityError(
                f"bundle {path}: object {digest[:12]} is corrupt (its data hashes to"
                f" {w.digest[:12]}); nothing imported"
            )
    except BaseException:
        w.abort()
        raise
    return w, manifest.model_dump(exclude={"digest", "size"})
