"""The streaming safetensors writer and atomic outputs."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from tvtool.checkpoints.writer import (
    SafetensorsStreamWriter,
    TensorSpec,
    atomic_output,
    build_header,
    parse_dtype,
    save_safetensors,
)
from tvtool.errors import TvtoolError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.bias": torch.randn(7, generator=g).half(),
        "c.bf": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "d.ids": torch.arange(4),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.0, dtype=torch.float64),
        "g.empty": torch.zeros(0, 4),
    }


def test_byte_identical_for_same_input(tmp_path: Path) -> None:
    meta = {"z": "1", "a": "2", "tool": "tvtool"}
    save_safetensors(tmp_path / "1.safetensors", tensors(), meta)
    save_safetensors(tmp_path / "2.safetensors", tensors(), dict(reversed(list(meta.items()))))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_loads_with_safetensors_library(tmp_path: Path) -> None:
    t = tensors()
    save_safetensors(tmp_path / "m.safetensors", t, {"recipe": json.dumps({"x": [1, 2]})})
    back = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert sorted(back) == sorted(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safetensors.safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"recipe": '{"x": [1, 2]}'}


def test_header_is_aligned_and_ordered() -> None:
    specs = [TensorSpec("b", (2,), torch.float32), TensorSpec("a", (3,), torch.float16)]
    raw = build_header(specs, {"k": "v"})
    (n,) = struct.unpack("<Q", raw[:8])
    assert len(raw) == 8 + n and n % 8 == 0
    header = json.loads(raw[8:])
    assert list(header) == ["__metadata__", "b", "a"]  # declared order is kept
    assert header["b"]["data_offsets"] == [0, 8]
    assert header["a"]["data_offsets"] == [8, 14]


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="strings"):
        save_safetensors(tmp_path / "m.safetensors", tensors(), {"n": 3})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())  # nothing left behind, not even a temp file


def test_stream_writer_checks_order_shape_and_completeness() -> None:
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2, 2), torch.float32)]
    w = SafetensorsStreamWriter(io.BytesIO(), specs)
    with pytest.raises(RuntimeError, match="out of order"):
        w.write("b", torch.zeros(2, 2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="shape"):
        w.write("b", torch.zeros(4))
    with pytest.raises(RuntimeError, match="never written"):
        w.finish()
    with pytest.raises(TvtoolError, match="duplicate"):
        SafetensorsStreamWriter(io.BytesIO(), [specs[0], specs[0]])


def test_stream_writer_casts_to_declared_dtype() -> None:
    buf = io.BytesIO()
    w = SafetensorsStreamWriter(buf, [TensorSpec("x", (3,), torch.float16)])
    w.write("x", torch.tensor([1.0, 2.5, -3.0]))
    w.finish()
    back = safetensors.torch.load(buf.getvalue())
    assert back["x"].dtype == torch.float16
    assert back["x"].tolist() == [1.0, 2.5, -3.0]


def test_stream_writer_non_contiguous_input() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # a transposed view
    buf = io.BytesIO()
    w = SafetensorsStreamWriter(buf, [TensorSpec("x", (4, 3), torch.float32)])
    w.write("x", x)
    w.finish()
    assert torch.equal(safetensors.torch.load(buf.getvalue())["x"], x)


def test_atomic_output_refuses_overwrite_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TvtoolError, match="--force"):
        with atomic_output(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(target, force=True) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_output(target, force=True) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(TvtoolError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "x.bin"):
            pass


def test_parse_dtype() -> None:
    assert parse_dtype("fp16") is torch.float16
    assert parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(None) is None
    with pytest.raises(TvtoolError, match="unknown dtype"):
        parse_dtype("fp8")


def test_writer_output_reads_back_through_tvtool_reader(tmp_path: Path) -> None:
    from tvtool.checkpoints.readers import open_checkpoint

    t = tensors()
    save_safetensors(tmp_path / "m.safetensors", t, {"a": "b"})
    with open_checkpoint(tmp_path / "m.safetensors") as r:
        assert r.metadata() == {"a": "b"}
        for k, v in t.items():
            assert torch.equal(r.get(k), v), k


# -- faults: signals, read-only directories, full disks (issue 8) ------------------------------

_WRITER_CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from tvtool.checkpoints.writer import atomic_output
target = Path(sys.argv[1])
# As in a foreground process: a background or nohup parent may have left these ignored, and an
# ignored signal is deliberately left alone by the writer.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
with atomic_output(target) as f:
    f.write(b"x" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_atomic_output_removes_its_part_file_on_signals(tmp_path: Path, sig: str) -> None:
    import signal
    import subprocess
    import sys

    target = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER_CHILD, str(target)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".out.safetensors.")
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=60)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its .part file
    if sig == "SIGINT":  # the default behaviour is kept: KeyboardInterrupt, then exit by SIGINT
        assert "KeyboardInterrupt" in stderr
    assert proc.returncode == -getattr(signal, sig)  # killed by the signal, as without us


def test_atomic_output_restores_signal_handlers(tmp_path: Path) -> None:
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    with atomic_output(tmp_path / "a.bin") as f:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        with atomic_output(tmp_path / "b.bin") as g:  # nested writes (shards) share them
            g.write(b"b")
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        f.write(b"a")
    assert {s: signal.getsignal(s) for s in before} == before


def test_atomic_output_read_only_directory_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through mode bits: use a directory no one can write
        with pytest.raises(TvtoolError, match="cannot write to"):
            with atomic_output(Path("/proc/self/x.bin")) as f:
                f.write(b"x")
        return
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(TvtoolError, match="cannot write to"):
            with atomic_output(d / "x.bin") as f:
                f.write(b"x")
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o755)


_FULL_DISK_CHILD = r"""
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from tvtool.checkpoints.writer import atomic_output
from tvtool.errors import TvtoolError
try:
    with atomic_output(Path(sys.argv[1])) as f:
        for _ in range(100):
            f.write(b"x" * 1024)
except TvtoolError as e:
    print(e)
"""


@pytest.mark.slow
def test_atomic_output_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path / "o.bin")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "failed" in out.stdout and "nothing was written" in out.stdout
    assert list(tmp_path.iterdir()) == []
