"""The local content-addressed store: sha256 blobs with manifest sidecars, and named refs.

Layout under the root::

    objects/sha256/ab/cdef...        data blob (safetensors or canonical JSON), mode 0444
    objects/sha256/ab/cdef....json   its Manifest, mode 0444; written last: the commit point
    refs/<name>                      a name (namespaces allowed: vit-b-32/cars) -> a digest
    tmp/                             in-flight writes (same filesystem), swept by gc
    store.json                       format version

An object exists iff its manifest exists. Torch-free, so that completion and `--help` stay fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.files import create_locked, fsync_dir, lock_file, open_whole_blob, touch
from tvtool.store.manifest import Manifest, ObjectKind, canonical_json

__all__ = ["ObjectWriter", "Store", "check_ref_name", "default_root", "is_valid_ref_name",
           "lock_file"]

STORE_FORMAT = 1
MIN_PREFIX = 8
_HEX = re.compile(r"^[0-9a-f]+$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def default_root() -> Path:
    """`$TVTOOL_HOME`, else `$XDG_CACHE_HOME/tvtool`, else `~/.cache/tvtool`."""
    if os.environ.get("TVTOOL_HOME"):
        return Path(os.environ["TVTOOL_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tvtool"
    return Path.home() / ".cache" / "tvtool"


def is_valid_ref_name(name: str) -> bool:
    return bool(_REF.match(name)) and ".." not in name.split("/")


def check_ref_name(name: str) -> str:
    if not is_valid_ref_name(name):
        raise TvtoolError(
            f"invalid name {name!r}: use letters, digits, '.', '_', '-' and '/' for namespaces"
        )
    return name


class ObjectWriter:
    """A locked temp file in `tmp/` that hashes what is written; `commit` moves it into place.

    Use as a context manager: an exception before `commit` removes the temp file.
    """

    def __init__(self, store: Store):
        self.store = store
        self.path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file: IO[bytes] = create_locked(self.path)
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    @property
    def digest(self) -> str:
        """sha256 of everything written so far."""
        return self._hash.hexdigest()

    def write(self, data: bytes | memoryview) -> int:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> str:
        """Flush and fsync the data (the file stays open and locked); returns the digest."""
        if not self._done:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._done = True
        return self.digest

    def commit(self, manifest_fields: dict[str, Any]) -> Manifest:
        """Move the blob into place and record its manifest (the commit point).

        The same bytes twice give one object and the first manifest wins. The temp file's lock
        travels with it into `objects/`, so gc cannot take the blob before its manifest exists.
        """
        digest = self.finish()
        manifest = Manifest(digest=digest, size=self.size, **manifest_fields)  # validate first
        blob = self.store.blob_path(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        try:
            existing = open_whole_blob(blob, self.size)
            if existing is not None:  # dedup: keep the blob that is there, refresh it for gc
                with existing:
                    touch(blob)
                    self.path.unlink()
                    return self.store._write_manifest(manifest)
            os.chmod(self.path, 0o444)
            os.replace(self.path, blob)
            fsync_dir(blob.parent)
            return self.store._write_manifest(manifest)
        finally:
            self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Store:
    """A store rooted at a directory (created on first write)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root else default_root()

    # -- layout -------------------------------------------------------------------------------
    @property
    def objects_dir(self) -> Path:
        return self.root / "objects" / "sha256"

    @property
    def refs_dir(self) -> Path:
        return self.root / "refs"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def init(self) -> Store:
        """Create the layout if needed and check the format version."""
        meta = self.root / "store.json"
        if meta.exists():
            try:
                fmt = json.loads(meta.read_text()).get("format")
            except (OSError, ValueError) as e:
                raise TvtoolError(f"{meta} is unreadable: {e}") from None
            if fmt != STORE_FORMAT:
                raise TvtoolError(
                    f"store {self.root} has format {fmt}; this tvtool reads {STORE_FORMAT}"
                )
        for d in (self.objects_dir, self.refs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            tmp = self.tmp_dir / f"store-{uuid.uuid4().hex}.json"
            with create_locked(tmp) as f:
                f.write((json.dumps({"format": STORE_FORMAT}) + "\n").encode())
                os.replace(tmp, meta)
        return self

    def exists(self) -> bool:
        return (self.root / "store.json").exists()

    def blob_path(self, digest: str) -> Path:
        return self.objects_dir / digest[:2] / digest[2:]

    def manifest_path(self, digest: str) -> Path:
        return self.objects_dir / digest[:2] / (digest[2:] + ".json")

    # -- writing ------------------------------------------------------------------------------
    def writer(self) -> ObjectWriter:
        self.init()
        return ObjectWriter(self)

    def put_bytes(self, data: bytes, **manifest_fields: Any) -> Manifest:
        with self.writer() as w:
            w.write(data)
            return w.commit(manifest_fields)

    def put_json(self, obj: Any, kind: ObjectKind, **manifest_fields: Any) -> Manifest:
        return self.put_bytes(canonical_json(obj), kind=kind, format="json", **manifest_fields)

    def _write_manifest(self, manifest: Manifest) -> Manifest:
        path = self.manifest_path(manifest.digest)
        if path.exists():
            touch(path)
            return self.manifest(manifest.digest)
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.manifest"
        with create_locked(tmp) as f:
            f.write(canonical_json(manifest.model_dump(mode="json")))
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            try:
                os.link(tmp, path)  # atomic create-if-absent: the first writer's manifest wins
            except FileExistsError:
                tmp.unlink()
                touch(path)
                return self.manifest(manifest.digest)
            tmp.unlink()
        fsync_dir(path.parent)
        return manifest

    # -- reading ------------------------------------------------------------------------------
    def iter_digests(self) -> Iterator[str]:
        """Digests of every committed object, sorted."""
        if not self.objects_dir.exists():
            return
        for fan in sorted(self.objects_dir.iterdir()):
            if fan.is_dir():
                for m in sorted(fan.glob("*.json")):
                    yield fan.name + m.name[: -len(".json")]

    def has(self, digest: str) -> bool:
        return self.manifest_path(digest).exists()

    def manifest(self, digest: str) -> Manifest:
        path = self.manifest_path(digest)
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise TvtoolError(f"object {digest[:12]} is not in store {self.root}") from None
        except ValueError as e:
            first = str(e).splitlines()[0]
            raise IntegrityError(
                f"manifest of {digest[:12]} is corrupt ({first}); run `tvtool store verify`"
            ) from None

    def read_json(self, digest: str) -> Any:
        try:
            return json.loads(self.blob_path(digest).read_bytes())
        except (OSError, ValueError) as e:
            raise IntegrityError(
                f"object {digest[:12]} is unreadable ({e}); run `tvtool store verify`"
            ) from None

    # -- names --------------------------------------------------------------------------------
    def resolve(self, name: str, kind: ObjectKind | tuple[str, ...] | None = None) -> str:
        """A ref name, a full digest or a unique prefix (>= 8 hex chars) -> full digest."""
        digest = self._resolve(name.strip())
        if kind is not None:
            kinds = (kind,) if isinstance(kind, str) else kind
            actual = self.manifest(digest).kind
            if actual not in kinds:
                raise TvtoolError(f"{name!r} is a {actual} object, expected {' or '.join(kinds)}")
        return digest

    def _resolve(self, name: str) -> str:
        if not name:
            raise TvtoolError("empty name: give a ref name or a digest")
        if is_valid_ref_name(name):
            ref = self.get_ref(name)
            if ref is not None:
                return ref
        raw = name.removeprefix("sha256:").lower()
        if _HEX.match(raw):
            if len(raw) < MIN_PREFIX:
                raise TvtoolError(
                    f"{name!r}: a digest prefix needs at least {MIN_PREFIX} hex characters"
                )
            fan = self.objects_dir / raw[:2]
            hits = sorted(
                raw[:2] + p.name[:-5] for p in fan.glob(raw[2:] + "*.json")
            ) if fan.is_dir() else []
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                shown = ", ".join(h[:16] for h in hits[:4])
                raise TvtoolError(
                    f"{name!r} is ambiguous: matches {len(hits)} objects ({shown});"
                    " give more characters"
                )
        raise TvtoolError(
            f"no ref or object named {name!r} in store {self.root} (see `tvtool store ls`)"
        )

    def ref_path(self, name: str) -> Path:
        return self.refs_dir / check_ref_name(name)

    def get_ref(self, name: str) -> str | None:
        """The digest a ref points at, or None (also for names that cannot be refs)."""
        if not is_valid_ref_name(name):
            return None
        path = self.refs_dir / name
        try:
            return path.read_text().strip() if path.is_file() else None
        except OSError:
            return None

    def refs(self) -> dict[str, str]:
        """Every ref name -> digest, sorted by name."""
        if not self.refs_dir.exists():
            return {}
        out = {}
        for p in sorted(self.refs_dir.rglob("*")):
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp"):
                try:
                    out[p.relative_to(self.refs_dir).as_posix()] = p.read_text().strip()
                except FileNotFoundError:  # removed meanwhile
                    continue
        return out

    def lock(self):
        """The store-wide lock held around ref updates and gc."""
        from filelock import FileLock

        self.init()
        return FileLock(str(self.root / "refs.lock"), timeout=60)

    def set_ref(self, name: str, digest: str, *, force: bool = True) -> str | None:
        """Point `name` at `digest` atomically; returns the previous digest, if any."""
        path = self.ref_path(name)
        with self.lock():
            if not self.has(digest):
                raise TvtoolError(f"cannot tag {digest[:12]}: no such object")
            old = self.get_ref(name)
            if old is not None and old != digest and not force:
                raise TvtoolError(
                    f"ref {name!r} already points at {old[:12]}; use --force to move it"
                )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise TvtoolError(
                    f"cannot create ref {name!r}: a ref named like its namespace exists"
                ) from None
            if path.is_dir():
                raise TvtoolError(f"cannot create ref {name!r}: it is a namespace of other refs")
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(digest + "\n")
            os.replace(tmp, path)
            fsync_dir(path.parent)
        return old

    def remove_ref(self, name: str) -> str:
        path = self.ref_path(name)
        if self.get_ref(name) is None:
            raise TvtoolError(f"no ref named {name!r} (see `tvtool store ls`)")
        with self.lock():
            digest = self.get_ref(name)
            if digest is None:
                raise TvtoolError(f"no ref named {name!r} (see `tvtool store ls`)")
            path.unlink()
            parent = path.parent
            while parent != self.refs_dir and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        return digest

    def names_for(self, digest: str) -> list[str]:
        return [n for n, d in self.refs().items() if d == digest]

    def names_by_digest(self) -> dict[str, list[str]]:
        """digest -> its ref names (sorted), for listing many objects at once."""
        out: dict[str, list[str]] = {}
        for name, digest in self.refs().items():
            out.setdefault(digest, []).append(name)
        return out

    def display_name(self, digest: str) -> str:
        names = self.names_for(digest)
        return names[0] if names else digest[:12]
