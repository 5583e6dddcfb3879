"""`checkpoints.prefetch.WriteBehind`: the bytes and sha256 of plain sequential writes, errors
raised to the caller, buffers reusable after the next write."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tvtool.checkpoints import prefetch
from tvtool.checkpoints.prefetch import WriteBehind


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_same_bytes_and_digest_as_sequential_writes(tmp_path: Path, monkeypatch, depth) -> None:
    monkeypatch.setattr(prefetch, "WRITEBACK_EVERY", 1000)  # hints between many writes
    pieces = [bytes([i % 251]) * (37 * i + 1) for i in range(60)]
    bufs = [bytearray(4000), bytearray(4000), bytearray(4000)]  # reused in turn
    with open(tmp_path / "out", "wb") as f:
        w = WriteBehind(f, depth=depth)
        for i, p in enumerate(pieces):
            b = bufs[i % (depth + 1)]
            b[: len(p)] = p
            assert w.write(memoryview(b)[: len(p)]) == len(p)
        digest = w.hexdigest()
        w.close()
    data = b"".join(pieces)
    assert (tmp_path / "out").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert w.size == len(data)


def test_an_error_on_the_thread_reaches_the_caller(tmp_path: Path) -> None:
    class Full:
        def __init__(self) -> None:
            self.n = 0

        def write(self, data) -> None:
            self.n += 1
            if self.n == 2:
                raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

    w = WriteBehind(Full())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="No space"):
        for _ in range(5):
            w.write(b"x" * 10)
        w.wait()
    w.close()


def test_writes_larger_than_a_slice_hash_as_one_stream(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prefetch, "SLICE", 1000)
    data = bytes(range(256)) * 40  # 10 slices and a part
    with open(tmp_path / "out", "wb") as f:
        w = WriteBehind(f)
        w.write(memoryview(data))
        w.write(b"tail")
        digest = w.hexdigest()
        w.close()
    assert (tmp_path / "out").read_bytes() == data + b"tail"
    assert digest == hashlib.sha256(data + b"tail").hexdigest()
