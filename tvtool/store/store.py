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

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.files import create_locked, fsync_dir, lock_file, touch
from tvtool.store.manifest import Manifest, ObjectKind, canonical_json
from tvtool.store.names import (
    MIN_PREFIX,
    _shown,
    check_namespaces,
    check_ref_name,
    is_digest,
    is_ref_path,
    is_valid_ref_name,
    looks_like_digest,
)
from tvtool.store.writer import ObjectWriter

__all__ = ["ObjectWriter", "Store", "check_namespaces", "check_ref_name", "default_root",
           "is_digest", "is_valid_ref_name", "lock_file"]

STORE_FORMAT = 1
_HEX = re.compile(r"[0-9a-f]+")


def default_root() -> Path:
    """`$TVTOOL_HOME`, else `$XDG_CACHE_HOME/tvtool`, else `~/.cache/tvtool`."""
    if os.environ.get("TVTOOL_HOME"):
        return Path(os.environ["TVTOOL_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tvtool"
    return Path.home() / ".cache" / "tvtool"


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
        with self._sealed(manifest) as tmp:
            try:
                os.link(tmp, path)  # atomic create-if-absent: the first writer's manifest wins
            except FileExistsError:
                tmp.unlink()
                touch(path)
                return self.manifest(manifest.digest)
            tmp.unlink()
        fsync_dir(path.parent)
        return manifest

    @contextlib.contextmanager
    def _sealed(self, manifest: Manifest) -> Iterator[Path]:
        """A temp file holding `manifest` (canonical JSON, fsynced, read-only), still locked
        while the caller links or moves it into place."""
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.manifest"
        with create_locked(tmp) as f:
            f.write(canonical_json(manifest.model_dump(mode="json")))
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            yield tmp

    def add_sources(self, digest: str, sources: list[dict[str, Any]]) -> Manifest:
        """Append `sources` (files an object was made from, e.g. the same weights in another
        format) to its manifest's `params.sources`, under the store lock. The only change a
        manifest ever sees: the data and every claim about it stay as first written."""
        with self.lock():
            manifest = self.manifest(digest)
            have = list(manifest.params.get("sources") or [])
            added = [s for s in sources if s not in have]
            if not added:
                return manifest
            updated = manifest.model_copy(
                update={"params": {**manifest.params, "sources": have + added}}
            )
            path = self.manifest_path(digest)
            with self._sealed(updated) as tmp:
                os.replace(tmp, path)
            fsync_dir(path.parent)
            return updated

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
        """A full digest, a unique prefix (>= 8 hex chars) or a ref name -> full digest.

        Digests always win: hex of 8+ characters is looked up as a digest first, and only a
        ref made by an older version with such a name is read when no object matches.
        """
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
        raw = name.removeprefix("sha256:").lower()
        if looks_like_digest(name):
            hits = self.digests_with_prefix(raw)
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                shown = ", ".join(h[:16] for h in hits[:4])
                raise TvtoolError(
                    f"{name!r} is ambiguous: matches {len(hits)} objects ({shown});"
                    " give more characters"
                )
        target = self._ref_target(name)
        if target is not None:
            return target
        if _HEX.fullmatch(raw) and len(raw) < MIN_PREFIX:
            raise TvtoolError(
                f"{name!r}: a digest prefix needs at least {MIN_PREFIX} hex characters"
            )
        raise TvtoolError(
            f"no ref or object named {_shown(name)} in store {self.root} (see `tvtool store ls`)"
        )

    def digests_with_prefix(self, prefix: str) -> list[str]:
        """Committed objects whose digest starts with `prefix` (hex, >= 2 characters)."""
        prefix = prefix.lower()
        if len(prefix) < 2 or not _HEX.fullmatch(prefix):
            return []
        fan = self.objects_dir / prefix[:2]
        if not fan.is_dir():
            return []
        return sorted(prefix[:2] + p.name[:-5] for p in fan.glob(prefix[2:] + "*.json"))

    def _ref_target(self, name: str) -> str | None:
        """A ref's digest, checked: a ref that holds anything else is an integrity failure."""
        target = self.get_ref(name)
        if target is not None and not is_digest(target):
            raise IntegrityError(
                f"ref {_shown(name)} is corrupt (it holds no digest); run `tvtool store verify`"
            )
        return target

    def ref_path(self, name: str) -> Path:
        """The file of a ref that may be created (strict name check)."""
        return self.refs_dir / check_ref_name(name)

    def get_ref(self, name: str) -> str | None:
        """What a ref holds (a digest unless corrupt), or None (also for names that cannot be
        refs). Refs made by older versions under names no longer accepted are read too."""
        if not is_ref_path(name):
            return None
        path = self.refs_dir / name
        try:
            return path.read_text(errors="replace").strip() if path.is_file() else None
        except OSError:
            return None

    def refs(self) -> dict[str, str]:
        """Every ref name -> what it holds, sorted by name: every file under refs/ except
        hidden ones (ref writes in flight), whatever its name; nothing is skipped silently."""
        if not self.refs_dir.exists():
            return {}
        out = {}
        for top, dirs, files in os.walk(self.refs_dir):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for f in files:
                if f.startswith("."):
                    continue
                p = Path(top) / f
                if not p.is_file():  # a fifo or device would block or lie: never a ref
                    out[p.relative_to(self.refs_dir).as_posix()] = ""
                    continue
                try:
                    out[p.relative_to(self.refs_dir).as_posix()] = (
                        p.read_text(errors="replace").strip()
                    )
                except (FileNotFoundError, IsADirectoryError):  # removed meanwhile
                    continue
                except OSError:
                    out[p.relative_to(self.refs_dir).as_posix()] = ""
        return dict(sorted(out.items()))

    def lock(self):
        """The store-wide lock held around ref updates and gc (not re-entrant)."""
        from filelock import FileLock

        self.init()
        return FileLock(str(self.root / "refs.lock"), timeout=60)

    def set_ref(self, name: str, digest: str, *, force: bool = True) -> str | None:
        """Point `name` at `digest` atomically; returns the previous digest, if any."""
        return self.set_refs({name: digest}, force=force).get(name)

    def set_refs(self, refs: dict[str, str], *, force: bool = True) -> dict[str, str]:
        """Set several refs at once, all or none: every name is checked (syntax, namespaces,
        each other, existing refs unless `force`) before any is written, under the store lock;
        a failure while writing restores the refs already written. Returns previous targets."""
        for name in refs:
            check_ref_name(name)
        check_namespaces(refs)
        with self.lock():
            return self.set_refs_locked(refs, force=force)

    def set_refs_locked(self, refs: dict[str, str], *, force: bool) -> dict[str, str]:
        """`set_refs` for a caller that holds `lock()`."""
        old: dict[str, str] = {}
        for name, digest in refs.items():
            path = self.ref_path(name)
            if not self.has(digest):
                raise TvtoolError(f"cannot tag {digest[:12]} as {name!r}: no such object")
            prev = self.get_ref(name)
            if prev is not None:
                old[name] = prev
                if prev != digest and not force:
                    raise TvtoolError(
                        f"ref {name!r} already points at {prev[:12]}; use --force to move it"
                    )
            self._check_free(name, path)
        done: list[str] = []
        try:
            for name, digest in refs.items():
                self._write_ref(name, digest)
                done.append(name)
        except BaseException:
            for name in done:  # roll back: nothing or everything
                if name in old:
                    self._write_ref(name, old[name])
                else:
                    self._unlink_ref(name)
            raise
        return old

    def _check_free(self, name: str, path: Path) -> None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if (self.refs_dir.joinpath(*parts[:i])).is_file():
                raise TvtoolError(
                    f"cannot create ref {name!r}: ref {'/'.join(parts[:i])!r} exists"
                    " (a name cannot be both a ref and a namespace)"
                )
        if path.is_dir():
            raise TvtoolError(f"cannot create ref {name!r}: it is a namespace of other refs")

    def _write_ref(self, name: str, digest: str) -> None:
        path = self.refs_dir / name
        tmp = path.parent / f".{uuid.uuid4().hex}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "x") as f:
                f.write(digest + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TvtoolError(f"cannot write ref {name!r}: {e.strerror or e}") from None
        fsync_dir(path.parent)

    def _unlink_ref(self, name: str) -> None:
        path = self.refs_dir / name
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.refs_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def remove_ref(self, name: str) -> str:
        """Remove a ref (also one made by an older version under a name no longer accepted)."""
        with self.lock():
            digest = self.get_ref(name)
            if digest is None:
                raise TvtoolError(f"no ref named {_shown(name)} (see `tvtool store ls`)")
            self._unlink_ref(name)
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
