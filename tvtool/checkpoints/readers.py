"""Read checkpoints tensor by tensor, whatever their format.

Formats: safetensors (one file, a `*.safetensors.index.json` shard index, or a directory of
shards), torch `.pt/.bin/.pth` state dicts (`weights_only=True`, memory-mapped), and whole pickled
`nn.Module` checkpoints through the restricted unpickler. Key names are normalised: a `module.` or
`model.` prefix shared by every key is stripped, as are `state_dict`-style wrappers.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvtool.checkpoints.header import file_sha256, looks_like_safetensors, read_index
from tvtool.errors import TvtoolError, few, printable

_PREFIXES = ("module.", "model.")
READ_SLICE = 1 << 19  # bytes read and hashed together by `read_into` (fits in L2)
_HASHER_LOCK = threading.Lock()


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def normalise_keys(keys: list[str]) -> dict[str, str]:
    """Map normalised name -> original name, stripping prefixes every key shares."""
    names = list(keys)
    stripped = True
    while stripped and names:
        stripped = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in names):
                names = [k[len(p):] for k in names]
                stripped = True
    return dict(zip(names, keys, strict=True))


def checkpoint_fingerprint(path: str | Path) -> str:
    """The content fingerprint of the checkpoint at `path` (see `fingerprint`)."""
    with open_checkpoint(path) as reader:
        return reader.fingerprint()




class CheckpointReader:
    """Tensor-by-tensor access to a checkpoint; use as a context manager."""

    format = "?"

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self.files = files
        self._fingerprint: str | None = None
        self._hasher: Any = None  # a fingerprint.ContentHasher once a tensor is read
        self.shared_reads = False  # True: callers never update what `get` returns in place
        self._names: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def raw_name(self, key: str) -> str:
        """The tensor's name as written (keys() are normalised, for matching only)."""
        return self._names[key]

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`; hashed on the side for `fingerprint` (unless that is known)."""
        t = self._read(key)
        if self._fingerprint is None:
            self._content_hasher().add(key, t, background=self.shared_reads)
        return t

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill the contiguous `out` (of the key's shape and dtype) with tensor `key`, hashed
        for `fingerprint` like `get`. Streamed commands reuse `out` (no allocation, no page
        faults per tensor); safetensors readers read and hash it slice by slice on the calling
        thread, so a worker thread per reader may call it (one call at a time per reader)."""
        out.copy_(self.get(key))

    def _content_hasher(self) -> Any:
        with _HASHER_LOCK:
            if self._hasher is None:
                from tvtool.checkpoints.fingerprint import ContentHasher

                self._hasher = ContentHasher()
            return self._hasher

    def fingerprint(self) -> str:
        """The content fingerprint (`tvtool.checkpoints.fingerprint`): sha256 over sorted
        names, dtypes, shapes and tensor bytes, the same for the same weights in any format.
        Tensors already read were hashed as they were read; only the others are read now."""
        if self._fingerprint is None:
            keys = self.keys()
            for k in keys:
                if self._hasher is None or k not in self._hasher:
                    self.get(k)
            if self._hasher is None:  # no tensors at all
                from tvtool.checkpoints.fingerprint import ContentHasher

                self._hasher = ContentHasher()
            self._fingerprint = self._hasher.hexdigest(keys)
            self._hasher.close()
            self._hasher = None
        return self._fingerprint

    def file_fingerprint(self) -> str:
        """sha256 of the file (for several shards: of their names and digests)."""
        if len(self.files) == 1:
            return file_sha256(self.files[0])
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda p: p.name):
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        self._close_hasher()

    def _close_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsReader(CheckpointReader):
    """One or several safetensors files, read with positioned reads (see safetensors_file)."""

    format = "safetensors"

    def __init__(self, path: Path, files: list[Path]):
        super().__init__(path, files)
        from tvtool.checkpoints.safetensors_file import SafetensorsFile

        self._files: list[SafetensorsFile] = []
        raw_to_file: dict[str, SafetensorsFile] = {}
        try:
            for f in files:
                sf = SafetensorsFile(f)
                self._files.append(sf)
                for k in sf.entries:
                    if k in raw_to_file:
                        raise TvtoolError(f"{path}: tensor {k!r} appears in two shards")
                    raw_to_file[k] = sf
        except BaseException:
            self.close()
            raise
        self._raw = raw_to_file
        self._names = normalise_keys(sorted(raw_to_file))

    @classmethod
    def stored(cls, path: Path, digest: str) -> SafetensorsReader:
        """A store object: names kept exactly as written (already normalised when stored) and
        the digest as fingerprint (the store hashed it on write; no second pass over the file)."""
        reader = cls(path, [path])
        reader._names = {k: k for k in sorted(reader._raw)}
        reader._fingerprint = digest
        return reader

    def meta(self, key: str) -> TensorMeta:
        raw = self._names[key]
        sf = self._raw[raw]
        return TensorMeta(sf.entries[raw].shape, sf.dtype(raw))

    def _read(self, key: str) -> torch.Tensor:
        raw = self._names[key]
        return self._raw[raw].read(raw)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        raw = self._names[key]
        sf = self._raw[raw]
        if (not out.is_contiguous() or tuple(out.shape) != sf.entries[raw].shape
                or out.dtype != sf.dtype(raw)):
            raise ValueError(f"read_into: `out` does not match tensor {key!r}")
        data = out.view(-1).view(torch.uint8).numpy()
        h = hashlib.sha256() if self._fingerprint is None else None
        for lo in range(0, data.size, READ_SLICE):  # each slice hashed while in the cache
            piece = data[lo: lo + READ_SLICE]
            sf.read_into(raw, piece, lo)
            if h is not None:
                h.update(piece)
        if h is not None:
            self._content_hasher().add_digest(key, out.dtype, tuple(out.shape), h.hexdigest())

    def range_reader(self, key: str):
        """For a float32 tensor whose fingerprint is known (nothing to hash on the side): a
        function `(out, start)` that fills the float32 numpy row `out` with elements start..
        of `key` by positioned reads (streamed reductions reuse one small buffer). Else None."""
        raw = self._names[key]
        sf = self._raw[raw]
        if self._fingerprint is None or sf.dtype(raw) != torch.float32:
            return None
        return lambda out, start: sf.read_into(raw, out, start)

    def shard_of(self, key: str) -> Path:
        """The file that holds tensor `key`."""
        return self._raw[self._names[key]].path

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for sf in self._files:
            out.update(sf.metadata)
        return out

    def close(self) -> None:
        self._close_hasher()
        for sf in self._files:
            sf.close()
        self._files = []


class _LoadedReader(CheckpointReader):
    """A reader whose tensors were loaded (or memory-mapped) into `_tensors` by name."""

    _tensors: dict[str, torch.Tensor]

    def meta(self, key: str) -> TensorMeta:
        t = self._tensors[self._names[key]]
        return TensorMeta(tuple(t.shape), t.dtype)

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[self._names[key]]


class TorchReader(_LoadedReader):
    """A torch pickle: a state dict (weights_only) or a whole module (restricted unpickler);
    loaded and checked by `torch_file.load_state`."""

    format = "torch"

    def __init__(self, path: Path):
        from tvtool.checkpoints.torch_file import load_state

        super().__init__(path, [path])
        loaded = load_state(path)
        self._tensors, self.skipped_non_tensor, self.format = loaded[:3]
        self.module_classes = loaded[3]  # e.g. which activation a pickled CLIP used
        self._names = normalise_keys(sorted(self._tensors))

    def close(self) -> None:
        self._close_hasher()
        self._tensors = {}


class TorchShardsReader(_LoadedReader):
    """Several torch shards (`pytorch_model-00001-of-00002.bin` ... with their index) read as
    one checkpoint; each shard is loaded (memory-mapped) and checked by `torch_file`."""

    format = "torch"

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, Path]):
        super().__init__(path, files)
        self._parts: list[TorchReader] = []
        tensors: dict[str, torch.Tensor] = {}
        where: dict[str, str] = {}
        try:
            for f in files:
                part = TorchReader(f)
                self._parts.append(part)
                for k, v in part._tensors.items():
                    if k in where:
                        raise TvtoolError(
                            f"{printable(str(path))}: tensor {k!r} is in two shards "
                            f"({where[k]} and {f.name})"
                        )
                    where[k] = f.name
                    tensors[k] = v
        except BaseException:
            self.close()
            raise
        stray = sorted(set(tensors) ^ set(weight_map))
        if stray:
            self.close()
            raise TvtoolError(
                f"{printable(str(path))}: the index and its shards disagree on {len(stray)} "
                f"tensor(s) (e.g. {stray[0]!r}): a stale index?"
            )
        self._tensors = tensors
        self.skipped_non_tensor = sorted({k for p in self._parts for k in p.skipped_non_tensor})
        self._names = normalise_keys(sorted(tensors))

    def close(self) -> None:
        self._close_hasher()
        for part in self._parts:
            part.close()
        self._parts = []
        self._tensors = {}


_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_TORCH_NAMES = ("pytorch_model.bin", "model.pt", "model.bin", "model.pth")


def _checkpoints_in(d: Path) -> CheckpointReader:
    """The checkpoint a directory holds, as transformers would pick it: a safetensors index,
    else its `.safetensors` files (shards when their names are disjoint), else a torch index,
    else one torch file. Several unrelated checkpoints are an error that names them."""
    st_index = sorted(d.glob("*.safetensors.index.json"))
    if len(st_index) > 1:
        raise _several(d, st_index)
    if st_index:
        return _from_index(st_index[0])
    shards = sorted(d.glob("*.safetensors"))
    if len(shards) > 1:
        _check_disjoint(d, shards)
    if shards:
        return SafetensorsReader(d, shards)
    pt_index = sorted(p for p in d.glob("*.index.json") if p.name.endswith(
        tuple(s + ".index.json" for s in _TORCH_SUFFIXES)))
    if len(pt_index) > 1:
        raise _several(d, pt_index)
    if pt_index:
        return _from_index(pt_index[0])
    named = [d / n for n in _TORCH_NAMES if (d / n).is_file()]
    if len(named) == 1:
        return TorchReader(named[0])
    found = sorted(p for p in d.iterdir() if p.suffix in _TORCH_SUFFIXES and p.is_file())
    if len(found) == 1:
        return TorchReader(found[0])
    if found:
        raise _several(d, found)
    raise TvtoolError(
        f"{printable(str(d))}: directory holds no checkpoint (.safetensors, a shard index, "
        "pytorch_model.bin or another .bin/.pt file)"
    )


def _several(d: Path, paths: list[Path]) -> TvtoolError:
    names = few([p.name for p in paths])
    return TvtoolError(
        f"{printable(str(d))} holds {len(paths)} checkpoints ({printable(names)}): give the "
        "file (or index) to read"
    )


def _check_disjoint(d: Path, files: list[Path]) -> None:
    """Safetensors files in one directory without an index are shards only if no tensor name
    appears twice; otherwise they are separate checkpoints (named in the error)."""
    from tvtool.checkpoints.header import read_header

    seen: set[str] = set()
    for f in files:
        names = set(read_header(f).entries)
        if names & seen:
            raise _several(d, files)
        seen |= names


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open any supported checkpoint for streaming reads."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TvtoolError(f"checkpoint not found: {p}")
    if p.is_dir():
        return _checkpoints_in(p)
    if p.name.endswith(".index.json"):
        return _from_index(p)
    if p.suffix == ".safetensors" or looks_like_safetensors(p):
        return SafetensorsReader(p, [p])
    return TorchReader(p)


def _from_index(index: Path) -> CheckpointReader:
    weight_map, _ = read_index(index)
    files = sorted(set(weight_map.values()))
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise TvtoolError(f"{index}: missing shard(s) {', '.join(missing[:3])}")
    if not all(f.suffix == ".safetensors" or looks_like_safetensors(f) for f in files):
        return TorchShardsReader(index, files, weight_map)
    reader = SafetensorsReader(index, files)
    stray = sorted(set(reader._raw) ^ set(weight_map))
    if stray:
        reader.close()
        raise TvtoolError(
            f"{index}: the index and its shards disagree on {len(stray)} tensor(s) "
            f"(e.g. {stray[0]!r}): a stale index?"
        )
    return reader
