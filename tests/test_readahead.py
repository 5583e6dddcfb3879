"""`CheckpointReader.read_into` (read and hashed slice by slice) and `ReadAhead` (a worker thread
filling reused buffers): the same tensors and the same content fingerprint as plain `get`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reader_helpers import content_fingerprint

from tvtool.checkpoints import readers
from tvtool.checkpoints.keymaps import KeyMappedReader
from tvtool.checkpoints.readahead import ReadAhead
from tvtool.checkpoints.readers import open_checkpoint
from tvtool.checkpoints.writer import save_safetensors


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 53, generator=g),
        "b.half": torch.randn(301, generator=g).half(),
        "c.empty": torch.zeros(0, 4),
        "d.scalar": torch.tensor(2.5),
        "e.ids": torch.arange(7),
    }


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_read_into_gives_the_tensors_and_the_fingerprint_of_get(
    tmp_path: Path, monkeypatch, fmt: str
) -> None:
    monkeypatch.setattr(readers, "READ_SLICE", 64)  # many slices per tensor
    sd = _state()
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        save_safetensors(path, sd)
    with open_checkpoint(path) as r:
        for k in ["a.weight", "b.half", "c.empty", "d.scalar"]:
            out = torch.full_like(sd[k], 7)
            r.read_into(k, out)
            assert torch.equal(out, sd[k])
        assert r.fingerprint() == content_fingerprint(sd)  # e.ids read by fingerprint()


def test_read_into_refuses_a_buffer_of_another_shape(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "m.safetensors", _state())
    with open_checkpoint(tmp_path / "m.safetensors") as r, pytest.raises(ValueError):
        r.read_into("a.weight", torch.empty(53, 37))


def test_read_ahead_yields_every_key_in_order_through_a_renaming_view(tmp_path: Path) -> None:
    sd = _state()
    save_safetensors(tmp_path / "m.safetensors", sd)
    keys = ["a.weight", "b.half", "c.empty", "d.scalar", "a.weight"]
    with open_checkpoint(tmp_path / "m.safetensors") as inner:
        r = KeyMappedReader(inner, {"x." + k: k for k in sd})
        with ReadAhead(r, ["x." + k for k in keys], depth=2) as ahead:
            for k in keys:
                t = ahead.take()
                assert t.dtype == sd[k].dtype
                assert torch.equal(t, sd[k])
                ahead.release()
        assert r.fingerprint() == content_fingerprint(sd)


def test_read_ahead_raises_the_workers_error_and_closes_early(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "m.safetensors", _state())
    with open_checkpoint(tmp_path / "m.safetensors") as r:
        with ReadAhead(r, ["a.weight", "a.weight", "a.weight"], depth=1) as ahead:
            ahead.take()  # never released: the worker waits, and close() ends it
        boom = type("Boom", (), {"meta": r.meta, "read_into": lambda *a: 1 / 0})()
        with ReadAhead(boom, ["a.weight"]) as ahead, pytest.raises(ZeroDivisionError):
            ahead.take()
