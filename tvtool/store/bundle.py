"""Self-contained bundles (a plain tar) for moving objects and their names between stores.

Layout: `bundle.json` (format, refs, object digests in order) first, then for each object
`objects/<digest>.json` (its manifest) and then `objects/<digest>` (its data), regular files
only. Import (`bundle_import`) relies on that order to check every declared size before it
reads the data it describes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.graph import walk
from tvtool.store.manifest import canonical_json
from tvtool.store.names import is_digest, ref_name_problem
from tvtool.store.store import Store, check_namespaces, check_ref_name

BUNDLE_FORMAT = 1
MAX_INDEX = 64 << 20  # bytes of bundle.json (a million objects is ~70 MB: refuse beyond)


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
    for name in refs:
        if ref_name_problem(name) is not None:
            check_ref_name(name)  # raises, naming the problem
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
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                data = canonical_json(index)
                _add(tar, "bundle.json", io.BytesIO(data), len(data))
                for d in objects:
                    for arcname, src in ((f"objects/{d}.json", store.manifest_path(d)),
                                         (f"objects/{d}", store.blob_path(d))):
                        with open(src, "rb") as m:
                            _add(tar, arcname, m, os.fstat(m.fileno()).st_size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**index, "size": out.stat().st_size}


def _add(tar: tarfile.TarFile, name: str, f, size: int) -> None:
    """One regular member, no owner or time (the same objects give the same bytes)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    tar.addfile(info, f)


def parse_index(data: bytes, path: Path) -> tuple[dict[str, str], list[str]]:
    """Validated (refs, object digests) from a bundle's `bundle.json`: well-formed digests,
    ref names tvtool would create, no ref that is another's namespace."""
    try:
        index = json.loads(data)
    except (ValueError, RecursionError):
        raise TvtoolError(f"{path} is not a tvtool bundle (bundle.json is not JSON)") from None
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        fmt = index.get("format") if isinstance(index, dict) else None
        raise TvtoolError(f"{path}: unsupported bundle format {str(fmt)[:40]!r}")
    objects, refs = index.get("objects"), index.get("refs", {})
    if not isinstance(objects, list) or not all(is_digest(d) for d in objects):
        raise IntegrityError(f"bundle {path}: malformed object list")
    if not isinstance(refs, dict) or not all(
        isinstance(n, str) and is_digest(d) for n, d in refs.items()
    ):
        raise IntegrityError(f"bundle {path}: malformed refs")
    for name in refs:
        try:
            check_ref_name(name)
        except TvtoolError as e:
            raise TvtoolError(f"bundle {path}: {e}; nothing imported") from None
    try:
        check_namespaces(refs)
    except TvtoolError as e:
        raise TvtoolError(f"bundle {path}: {e}; nothing imported") from None
    return refs, list(dict.fromkeys(objects))
