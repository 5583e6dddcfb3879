"""`ObjectWriter`: the one way bytes become a store object (temp file, hash, fsync, place).

A crash at any moment leaves either the whole object or none: the blob is renamed into place
only when complete, and the manifest (the commit point) is linked in last.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tvtool.checkpoints.prefetch import WriteBehind
from tvtool.store.files import create_locked, fsync_dir, open_whole_blob, touch
from tvtool.store.manifest import Manifest

if TYPE_CHECKING:
    from tvtool.store.store import Store


HASH_BEHIND = 1 << 16  # bytes from which a write is hashed on the hashing thread


class ObjectWriter:
    """A locked temp file in `tmp/` that hashes what is written; `commit` moves it into place.

    Writes (`checkpoints.prefetch.WriteBehind`) and the sha256 of what is written run behind
    the caller on two threads of their own, so that neither waits for the other (hashlib
    releases the GIL for large buffers): a buffer given to `write` must stay unchanged until
    the next `write` returns. Use as a context manager: an exception before `commit` removes
    the temp file.
    """

    def __init__(self, store: Store):
        self.store = store
        self.path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file: IO[bytes] = create_locked(self.path)
        self._behind = WriteBehind(self._file, hashed=False)
        self._hash = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None
        self._hashing: deque[Future[None]] = deque()
        self._done = False

    @property
    def digest(self) -> str:
        """sha256 of everything written so far."""
        self._hashed()
        return self._hash.hexdigest()

    @property
    def size(self) -> int:
        return self._behind.size

    def write(self, data: bytes | memoryview) -> int:
        if memoryview(data).nbytes < HASH_BEHIND:  # headers: not worth a thread hop
            self._hashed()
            self._hash.update(data)
        else:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="tvtool-hash")
            self._hashing.append(self._hasher.submit(self._hash.update, data))
            while len(self._hashing) > 1:  # the previous buffer is hashed: the caller's again
                self._hashing.popleft().result()
        return self._behind.write(data)

    def _hashed(self) -> None:
        """Every buffer handed to `write` is in the hash."""
        while self._hashing:
            self._hashing.popleft().result()

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._behind.wait()
        self._file.flush()

    def finish(self) -> str:
        """Flush and fsync the data (the file stays open and locked); returns the digest."""
        if not self._done:
            self._behind.wait()
            self._hashed()
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
            self._close_threads()
            self._file.close()

    def _close_threads(self) -> None:
        self._behind.close()
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None
        self._hashing.clear()

    def abort(self) -> None:
        self._close_threads()
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
