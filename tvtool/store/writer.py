"""`ObjectWriter`: the one way bytes become a store object (temp file, hash, fsync, place).

A crash at any moment leaves either the whole object or none: the blob is renamed into place
only when complete, and the manifest (the commit point) is linked in last.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tvtool.checkpoints.prefetch import WriteBehind
from tvtool.store.files import create_locked, fsync_dir, open_whole_blob, touch
from tvtool.store.manifest import Manifest

if TYPE_CHECKING:
    from tvtool.store.store import Store


class ObjectWriter:
    """A locked temp file in `tmp/` that hashes what is written; `commit` moves it into place.

    Writes and hashing run behind the caller (`checkpoints.prefetch.WriteBehind`): a buffer
    given to `write` must stay unchanged until the next `write` returns. Use as a context
    manager: an exception before `commit` removes the temp file.
    """

    def __init__(self, store: Store):
        self.store = store
        self.path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file: IO[bytes] = create_locked(self.path)
        self._behind = WriteBehind(self._file)
        self._done = False

    @property
    def digest(self) -> str:
        """sha256 of everything written so far."""
        return self._behind.hexdigest()

    @property
    def size(self) -> int:
        return self._behind.size

    def write(self, data: bytes | memoryview) -> int:
        return self._behind.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._behind.wait()
        self._file.flush()

    def finish(self) -> str:
        """Flush and fsync the data (the file stays open and locked); returns the digest."""
        if not self._done:
            self._behind.wait()
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
        try:
            return place(self.store, self.path, manifest)[0]
        finally:
            self._behind.close()
            self._file.close()

    def abort(self) -> None:
        self._behind.close()
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def place(store: Store, tmp: Path, manifest: Manifest) -> tuple[Manifest, bool]:
    """Move a complete temp file (its bytes hash to `manifest.digest`) into place and record
    its manifest; (the manifest, whether the file was moved rather than deduplicated). The
    same bytes twice give one object and the first manifest wins."""
    blob = store.blob_path(manifest.digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    existing = open_whole_blob(blob, manifest.size)
    if existing is not None:  # dedup: keep the blob that is there, refresh it for gc
        with existing:
            touch(blob)
            tmp.unlink()
            return store._write_manifest(manifest), False
    os.chmod(tmp, 0o444)
    os.replace(tmp, blob)
    fsync_dir(blob.parent)
    return store._write_manifest(manifest), True
