"""Load a torch `.pt/.bin/.pth` checkpoint into a flat {name: tensor} dict, defensively.

Order of attempts: `weights_only=True` (memory-mapped when the zip archive stores its members
uncompressed), then the restricted unpickler of `safe_unpickle` for whole pickled modules. Before
torch sees a zip archive its central directory is checked: members must lie inside the file
without overlapping, and DEFLATE-compressed members (a `.pt` re-zipped) are never memory-mapped,
since a map would expose the compressed bytes as tensor data; they are inflated by torch's reader,
only when their declared total stays below `MAX_INFLATED` (zip bombs fail here, in milliseconds).

After loading, every tensor is checked against its storage: a view whose elements reach past its
storage, or that has more elements than the storage (stride-0 or overlapping views of a tiny
storage, which would expand to gigabytes on the first arithmetic), is refused before any
computation, and the total declared bytes are bounded by a multiple of the file size.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from tvtool.checkpoints.header import check_name
from tvtool.errors import TvtoolError, UnsafePickleError, printable

MAX_INFLATED = 1 << 30  # bytes a compressed torch archive may declare in all
MAX_EXPANSION = 8  # declared tensor bytes per file byte (tied weights share storages)
MAX_DEPTH = 8  # nested {"state_dict": {"model": ...}} wrappers
WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "params")


def _bad(path: Path, why: str) -> TvtoolError:
    return TvtoolError(f"{printable(str(path))}: not a readable torch checkpoint ({why})")


def _first(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def check_archive(path: Path) -> bool:
    """Validate a torch zip archive's directory; True if it may be memory-mapped (all members
    stored), False if it is not a zip (legacy format) or holds compressed members."""
    if not zipfile.is_zipfile(path):
        return False
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        raise _bad(path, f"broken zip archive: {_first(e)}") from None
    compressed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    spans = sorted((i.header_offset, i.header_offset + 30 + len(i.filename.encode()) +
                    i.compress_size, i.filename) for i in infos)
    end = 0
    for begin, stop, name in spans:
        if begin < end:
            raise _bad(path, f"zip members overlap at {printable(name)}")
        end = stop
    if end > size:
        raise _bad(path, "zip members reach past the end of the file")
    if compressed:
        bad = {i.compress_type for i in compressed} - {zipfile.ZIP_DEFLATED}
        if bad:
            raise _bad(path, f"zip members use unsupported compression {sorted(bad)}")
        inflated = sum(i.file_size for i in compressed)
        if inflated > MAX_INFLATED:
            raise _bad(
                path, f"compressed archive expands to {inflated:,} bytes (more than "
                f"{MAX_INFLATED:,}): re-save it uncompressed with torch.save or as safetensors"
            )
        _verify_members(path, compressed)
        return False
    return True


def _verify_members(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Inflate each compressed member in 1 MB steps (memory stays bounded) and check that it
    gives exactly its declared size and CRC, so torch's reader later sees consistent members."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in members:
                with z.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _bad(path, f"corrupt compressed member: {_first(e)}") from None


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy (non-zip) format


def _load(path: Path) -> Any:
    with warnings.catch_warnings():  # weights_only's note on pickle protocols > 2: not for users
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return _load_any(path)


def _load_any(path: Path) -> Any:
    from tvtool.checkpoints.safe_unpickle import RestrictedUnpickler, restricted_pickle

    mmap = check_archive(path)
    zipped = mmap or zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass  # not a plain state dict: fall back to the restricted unpickler
    except RecursionError:
        raise _bad(path, "nested too deeply") from None
    except Exception as e:
        raise _bad(path, _first(e)) from None
    try:
        with warnings.catch_warnings():  # e.g. "couldn't retrieve source code" for stubs
            warnings.simplefilter("ignore")
            if not zipped:  # a plain `pickle.dump` file, or torch's legacy format
                with open(path, "rb") as f:
                    obj = RestrictedUnpickler(f).load()
                if not (isinstance(obj, int) and obj == _LEGACY_MAGIC):
                    return obj
            return torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle,
                mmap=mmap,
            )
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{printable(str(path))}: {e}") from None
    except RecursionError:
        raise _bad(path, "nested too deeply") from None
    except Exception as e:
        raise _bad(path, _first(e)) from None


def _unwrap(obj: Any, path: Path, depth: int = 0) -> dict[Any, Any]:
    from tvtool.checkpoints.safe_unpickle import Stub, tensors_from_object

    if depth > MAX_DEPTH:
        raise _bad(path, f"state dict wrapped more than {MAX_DEPTH} levels deep")
    if isinstance(obj, Stub):
        return dict(tensors_from_object(obj))
    if isinstance(obj, dict):
        if not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for w in WRAPPERS:
                inner = obj.get(w)
                if isinstance(inner, (dict, Stub)):
                    return _unwrap(inner, path, depth + 1)
        if any(isinstance(v, Stub) for v in obj.values()):
            return dict(tensors_from_object(obj))
        return obj
    raise _bad(path, f"it holds a {type(obj).__name__}, not a state dict or module")


def check_view(t: torch.Tensor) -> str | None:
    """Why `t` may not be used (a view larger than, or reaching past, its storage), or None."""
    if t.layout != torch.strided:
        return f"{t.layout} tensors are not supported"
    n = t.numel()
    if n == 0:
        return None
    item = t.element_size()
    have = t.untyped_storage().nbytes() // item
    if any(st < 0 for st in t.stride()):  # pragma: no cover - torch refuses negative strides
        return "negative strides"
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    if last >= have:
        return f"its view reaches element {last:,} of a storage of {have:,}"
    if n > have:
        return f"a view of {n:,} elements over a storage of {have:,} (stride-0 or overlapping)"
    return None


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], list[str], str, set[str]]:
    """(tensors by original key, non-tensor keys skipped, format, classes a module pickle
    named) of a torch checkpoint."""
    from tvtool.checkpoints.safe_unpickle import module_classes

    obj = _load(path)
    fmt = "torch" if isinstance(obj, dict) else "torch-module"
    try:
        classes = module_classes(obj)
    except RecursionError:  # pragma: no cover - module_classes walks iteratively
        classes = set()
    try:
        state = _unwrap(obj, path)
    except RecursionError:
        raise _bad(path, "nested too deeply") from None
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    total = 0
    for k, v in state.items():
        try:
            check_name(k, "key")
        except ValueError as e:
            raise _bad(path, str(e)) from None
        if not isinstance(v, torch.Tensor):
            skipped.append(k)
            continue
        why = check_view(v)
        if why:
            raise _bad(path, f"tensor {k!r}: {why}")
        total += v.numel() * v.element_size()
        tensors[k] = v
    if not tensors:
        raise _bad(path, "it holds no tensors")
    limit = MAX_EXPANSION * os.path.getsize(path) + (1 << 20)
    if total > limit:
        raise _bad(path, f"its tensors declare {total:,} bytes, more than the file can hold")
    return tensors, sorted(skipped), fmt, classes
