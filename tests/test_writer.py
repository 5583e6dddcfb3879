"""The streaming safetensors writer and atomic outputs."""

from __future__ import annotations

import io
import json
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
