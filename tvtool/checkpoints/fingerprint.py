"""Content fingerprints: the identity of a checkpoint's weights, whatever file holds them.

    fingerprint = sha256(concat over sorted names: "name\\tdtype\\tshape\\tsha256(bytes)\\n")

over the reader's (normalised) tensor names, so the same weights saved as `.pt`, as one
`.safetensors` file or as shards (with or without a shared `module.` prefix) have one identity,
while any change of a value, dtype, shape or name gives another. Per-tensor digests let the
tensors be hashed in whatever order they are read: readers hash each tensor as it is read
(on a worker thread when the caller promises not to update it in place, `shared_reads`:
hashlib releases the GIL, so hashing overlaps the caller's arithmetic), so a fingerprint after
a full streamed pass costs no second read, and only the tensors nobody read are read for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

MAX_PENDING = 2  # tensors kept alive while waiting for the hashing thread


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in row-major order (native, i.e. little-endian, byte order)."""
    flat = t.detach().contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def _line(name: str, dtype: torch.dtype, shape: tuple[int, ...], digest: str) -> str:
    return f"{name}\t{str(dtype).removeprefix('torch.')}\t{list(shape)}\t{digest}\n"


class ContentHasher:
    """Collects per-tensor digests (hashed on one worker thread) and combines them."""

    def __init__(self) -> None:
        self._lines: dict[str, str | Future[str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[str]] = []
        self._lock = threading.Lock()  # a fingerprint may be taken on a thread while reading

    def __contains__(self, name: str) -> bool:
        return name in self._lines

    def add(self, name: str, t: torch.Tensor, *, background: bool = False) -> None:
        """Hash `t` as the content of `name`: now, or with `background` on the worker thread
        (at most MAX_PENDING in flight; the caller must not modify `t` in place meanwhile)."""
        with self._lock:
            if name in self._lines:
                return
            if not background:
                self._lines[name] = _line(name, t.dtype, tuple(t.shape), tensor_digest(t))
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="tvtool-hash")
            self._pending = [f for f in self._pending if not f.done()]
            while len(self._pending) >= MAX_PENDING:
                self._pending.pop(0).result()
            dtype, shape = t.dtype, tuple(t.shape)
            fut = self._pool.submit(lambda: _line(name, dtype, shape, tensor_digest(t)))
            self._pending.append(fut)
            self._lines[name] = fut

    def add_digest(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], digest: str
    ) -> None:
        """Record `name`'s content from a sha256 of its bytes taken by the caller (e.g. slice
        by slice as it was read)."""
        with self._lock:
            self._lines.setdefault(name, _line(name, dtype, shape, digest))

    def hexdigest(self, names: list[str]) -> str:
        """The fingerprint over exactly `names` (each must have been added)."""
        h = hashlib.sha256()
        for name in sorted(names):
            line = self._lines[name]
            if isinstance(line, Future):
                line = self._lines[name] = line.result()
            h.update(line.encode())
        return h.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending = []


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """The content fingerprint of an in-memory state dict (names as given)."""
    return content_fingerprint(
        {k: (t.dtype, tuple(t.shape), tensor_digest(t)) for k, t in tensors.items()}
    )


def content_fingerprint(digests: dict[str, tuple[torch.dtype, tuple[int, ...], str]]) -> str:
    """The content fingerprint from per-tensor digests: name -> (dtype, shape, sha256 of the
    bytes), e.g. taken while streaming the tensors in slices."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(_line(name, *digests[name]).encode())
    return h.hexdigest()


def _stat_key(files: list) -> str:
    """Identity of the files' current contents as the kernel sees them: device, inode, size,
    mtime and ctime (ctime cannot be set from user space, so a rewrite always changes it)."""
    import os

    parts = []
    for f in sorted(str(p) for p in files):
        st = os.stat(f)
        parts.append(f"{os.path.realpath(f)}|{st.st_dev}|{st.st_ino}|{st.st_size}|"
                     f"{st.st_mtime_ns}|{st.st_ctime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class FingerprintCache:
    """Content fingerprints of checkpoint files, keyed by their stat identity (`_stat_key`),
    one small file per entry under `folder`: a base extracted against many fine-tunes is
    hashed once. An entry is only trusted while every file is unchanged, and only written when
    the files are as they were when `get` (or `apply`) first looked, before they were read: a
    file rewritten while it was being hashed gets no entry (its hash may mix both contents)."""

    def __init__(self, folder) -> None:
        from pathlib import Path

        self.folder = Path(folder)

    def _entry(self, reader):
        try:
            return self.folder / _stat_key(reader.files)
        except OSError:
            return None

    def get(self, reader) -> str | None:
        """The cached fingerprint of `reader`'s files if they are unchanged, else None. Call it
        before reading the files: it remembers their stat identity for `put`."""
        entry = self._entry(reader)
        if entry is None:
            return None
        if getattr(reader, "_stat_seen", None) is None:
            with contextlib.suppress(AttributeError):
                reader._stat_seen = entry.name
        try:
            fp = entry.read_text().strip()
        except OSError:
            return None
        if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
            return None
        return fp

    def apply(self, reader) -> bool:
        """Give `reader` its cached fingerprint (True) if the files are unchanged."""
        if getattr(reader, "_fingerprint", None) is not None:
            return False
        fp = self.get(reader)
        if fp is None:
            return False
        reader._fingerprint = fp
        return True

    def put(self, reader, fingerprint: str | None = None) -> None:
        """Cache `fingerprint` (default: the one `reader` knows) for its files as they are,
        unless they changed since `get` looked at them."""
        import os
        import uuid

        fp = fingerprint or getattr(reader, "_fingerprint", None)
        entry = self._entry(reader)
        if not fp or entry is None:
            return
        seen = getattr(reader, "_stat_seen", None)
        if seen is not None and seen != entry.name:  # rewritten while it was read
            return
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{uuid.uuid4().hex}.tmp"
            tmp.write_text(fp + "\n")
            os.replace(tmp, entry)
