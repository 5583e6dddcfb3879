"""Self-contained bundles (a plain tar) for moving objects and their names between stores."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.manifest import Manifest, canonical_json
from tvtool.store.store import Store

BUNDLE_FORMAT = 1


def closure(store: Store, digests: list[str]) -> list[str]:
    """The objects and everything their manifests name as inputs (that the store holds)."""
    seen: list[str] = []
    stack = list(reversed(digests))
    while stack:
        d = stack.pop()
        if d in seen or not store.has(d):
            continue
        seen.append(d)
        stack.extend(reversed(store.manifest(d).inputs))
    return seen


def export_bundle(store: Store, names: list[str], out: Path) -> dict:
    """Write the named objects (refs kept) and their inputs to `out` atomically."""
    refs: dict[str, str] = {}
    roots: list[str] = []
    for name in names:
        digest = store.resolve(name)
        roots.append(digest)
        for ref in store.names_for(digest):
            if ref == name or name not in store.refs():
                refs[ref] = digest
    objects = closure(store, roots)
    index = {"format": BUNDLE_FORMAT, "refs": dict(sorted(refs.items())), "objects": objects}
    tmp = out.with_name(f".{out.name}.part")
    with tarfile.open(tmp, "w") as tar:
        data = canonical_json(index)
        _add_bytes(tar, "bundle.json", data)
        for d in objects:
            tar.add(store.manifest_path(d), arcname=f"objects/{d}.json")
            tar.add(store.blob_path(d), arcname=f"objects/{d}")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return index


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def import_bundle(store: Store, path: Path, *, force: bool = False) -> dict:
    """Verify every object's hash while copying it in, then set the bundle's refs."""
    try:
        tar = tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise TvtoolError(f"{path} is not a tvtool bundle: {e}") from None
    with tar:
        try:
            index = json.loads(tar.extractfile("bundle.json").read())  # type: ignore[union-attr]
        except (KeyError, AttributeError, ValueError):
            raise TvtoolError(f"{path} is not a tvtool bundle (no bundle.json)") from None
        if index.get("format") != BUNDLE_FORMAT:
            raise TvtoolError(f"{path}: unsupported bundle format {index.get('format')}")
        imported = []
        for digest in index["objects"]:
            try:
                mdata = tar.extractfile(f"objects/{digest}.json").read()  # type: ignore[union-attr]
                blob = tar.extractfile(f"objects/{digest}")
            except KeyError:
                raise IntegrityError(f"bundle {path} lacks object {digest[:12]}") from None
            manifest = Manifest.model_validate_json(mdata)
            if manifest.digest != digest:
                raise IntegrityError(f"bundle {path}: manifest of {digest[:12]} names another digest")
            with store.writer() as w:
                while chunk := blob.read(1 << 20):  # type: ignore[union-attr]
                    w.write(chunk)
                if w._hash.hexdigest() != digest:
                    w.abort()
                    raise IntegrityError(f"bundle {path}: object {digest[:12]} is corrupt; nothing imported from it")
                fields = manifest.model_dump(exclude={"digest", "size"})
                w.commit(fields)
            imported.append(digest)
        for name, digest in index.get("refs", {}).items():
            store.set_ref(name, digest, force=force)
    return {"objects": imported, "refs": index.get("refs", {})}
