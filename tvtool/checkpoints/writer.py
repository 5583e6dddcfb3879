"""Stream safetensors: header first (from declared specs), then tensors one at a time.

Peak memory is one tensor. Key order and metadata order are deterministic, so the same inputs
give byte-identical files. `atomic_output` writes beside the target, fsyncs and renames.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from tvtool.errors import TvtoolError, printable

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise TvtoolError(f"unknown dtype {name!r}: use fp32, fp16 or bf16") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings: {bad}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for s in specs:
        if s.dtype not in DTYPE_TO_ST:
            raise TvtoolError(f"cannot write tensor {s.name!r} of dtype {s.dtype}")
        end = offset + s.nbytes
        header[s.name] = {
            "dtype": DTYPE_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [offset, end]
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsStreamWriter:
    """Writes the header for `specs` at once; `write` must then be called in spec order."""

    def __init__(
        self, f: IO[bytes], specs: list[TensorSpec], metadata: dict[str, str] | None = None
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise TvtoolError("duplicate tensor names in output")
        self._f = f
        self._specs = specs
        self._next = 0
        f.write(build_header(specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise RuntimeError(f"unexpected tensor {name!r}: all declared tensors written")
        spec = self._specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {spec.name!r})")
        t = tensor.detach()
        if t.dtype != spec.dtype:
            t = t.to(spec.dtype)
        if tuple(t.shape) != spec.shape:
            raise RuntimeError(f"tensor {name!r} has shape {tuple(t.shape)}, declared {spec.shape}")
        t = t.to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._specs):
            missing = self._specs[self._next].name
            raise RuntimeError(f"output incomplete: tensor {missing!r} was never written")


_CLEANUP_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n)
)
_pending: set[Path] = set()  # temp files being written, removed if a signal ends the process
_saved: dict[int, Any] = {}  # handlers we replaced, restored when the last write ends


def _on_signal(signum: int, frame: Any) -> None:
    """Remove every temp file in flight, restore the handlers, then behave as before us."""
    for p in list(_pending):
        with contextlib.suppress(OSError):
            p.unlink()
    _pending.clear()
    previous = _saved.get(signum, signal.SIG_DFL)
    _restore()
    if callable(previous):
        previous(signum, frame)  # e.g. SIGINT's KeyboardInterrupt
    else:
        os.kill(os.getpid(), signum)  # the default action: terminate with that signal


def _restore() -> None:
    for signum, handler in _saved.items():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, handler)
    _saved.clear()


@contextlib.contextmanager
def removed_on_signal(tmp: Path) -> Iterator[None]:
    """While the block runs, SIGTERM/SIGHUP/SIGINT first delete `tmp` (handlers installed only
    here, in the main thread, and not for signals the process ignores; restored after)."""
    main = threading.current_thread() is threading.main_thread()
    if main and not _pending:
        for signum in _CLEANUP_SIGNALS:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN or current is None:
                continue  # e.g. SIGHUP under nohup: the write should survive it
            _saved[signum] = current
            signal.signal(signum, _on_signal)
    _pending.add(tmp)
    try:
        yield
    finally:
        _pending.discard(tmp)
        if main and not _pending:
            _restore()


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool = False) -> Iterator[IO[bytes]]:
    """A hidden temp file `.NAME.<id>.part` beside `path`, renamed onto it (after fsync) only if
    the block succeeds; removed on errors and on SIGTERM/SIGHUP/SIGINT. OS errors (read-only
    directory, full disk) become one-line TvtoolErrors."""
    path = Path(path)
    if path.exists() and not force:
        raise TvtoolError(f"{printable(str(path))} exists; use --force to overwrite it")
    if not path.parent.exists():
        raise TvtoolError(f"output directory {printable(str(path.parent))} does not exist")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    with removed_on_signal(tmp):
        try:
            f = open(tmp, "xb")  # noqa: SIM115
        except OSError as e:
            raise TvtoolError(
                f"cannot write to {printable(str(path.parent))} ({e.strerror})"
            ) from None
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                f.close()
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and not isinstance(e, TvtoolError):
                raise TvtoolError(
                    f"writing {printable(str(path))} failed ({e.strerror or e}); nothing was "
                    "written"
                ) from None
            raise


def save_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    force: bool = False,
) -> None:
    """Write a small in-memory dict (tests, zoo) with the same deterministic writer."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with atomic_output(path, force=force) as f:
        w = SafetensorsStreamWriter(f, specs, metadata)
        for k, v in tensors.items():
            w.write(k, v)
        w.finish()
