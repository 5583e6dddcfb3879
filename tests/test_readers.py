"""Checkpoint readers: every format, key normalisation, the restricted unpickler, bad files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
from pickled_modules import ImageEncoder, save_under_fake_module
from reader_helpers import content_fingerprint

from tvtool.checkpoints.readers import normalise_keys, open_checkpoint
from tvtool.checkpoints.safe_unpickle import Stub
from tvtool.errors import TvtoolError, UnsafePickleError


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=g),
        "visual.proj": torch.randn(4, 3, generator=g),
        "visual.ln.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "logit_scale": torch.tensor(2.5),
        "text.position_ids": torch.arange(6),
    }


def read_all(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# -- formats ----------------------------------------------------------------------------------


def test_safetensors_single(tmp_path: Path) -> None:
    sd = state()
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors", metadata={"a": "b"})
    with open_checkpoint(tmp_path / "m.safetensors") as r:
        assert r.keys() == sorted(sd)
        assert r.meta("visual.proj").shape == (4, 3)
        assert r.meta("visual.ln.bias").dtype == torch.bfloat16
        assert r.metadata() == {"a": "b"}
        assert r.format == "safetensors"
        assert r.fingerprint() == content_fingerprint(sd)
    assert_same(read_all(tmp_path / "m.safetensors"), sd)


def test_safetensors_without_suffix_is_sniffed(tmp_path: Path) -> None:
    safetensors.torch.save_file(state(), tmp_path / "weights")
    assert_same(read_all(tmp_path / "weights"), state())


def _shards(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = state()
    keys = sorted(sd)
    parts = {
        "model-00001-of-00002.safetensors": keys[:2],
        "model-00002-of-00002.safetensors": keys[2:],
    }
    d = tmp_path / "sharded"
    d.mkdir()
    weight_map = {}
    for fname, ks in parts.items():
        safetensors.torch.save_file({k: sd[k] for k in ks}, d / fname)
        weight_map.update(dict.fromkeys(ks, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d, sd


def test_sharded_via_index_and_directory(tmp_path: Path) -> None:
    d, sd = _shards(tmp_path)
    assert_same(read_all(d / "model.safetensors.index.json"), sd)
    assert_same(read_all(d), sd)
    (d / "model.safetensors.index.json").unlink()
    assert_same(read_all(d), sd)  # a directory of shards without an index


def test_sharded_fingerprint_changes_with_a_shard(tmp_path: Path) -> None:
    d, sd = _shards(tmp_path)
    with open_checkpoint(d) as r:
        before = r.fingerprint()
    second = sorted(sd)[2:]
    changed = {k: sd[k] + 1 for k in second}
    safetensors.torch.save_file(changed, d / "model-00002-of-00002.safetensors")
    with open_checkpoint(d) as r:
        assert r.fingerprint() != before


def test_index_with_missing_shard(tmp_path: Path) -> None:
    d, _ = _shards(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TvtoolError, match="missing shard"):
        open_checkpoint(d / "model.safetensors.index.json")


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "model_prefix", "legacy"])
def test_torch_state_dicts(tmp_path: Path, wrap: str) -> None:
    sd = state()
    path = tmp_path / "m.pt"
    if wrap == "plain":
        torch.save(sd, path)
    elif wrap == "state_dict":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif wrap == "module_prefix":  # DistributedDataParallel
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif wrap == "model_prefix":
        torch.save({f"model.{k}": v for k, v in sd.items()}, path)
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert_same(read_all(path), sd)


def test_pytorch_model_bin_in_directory(tmp_path: Path) -> None:
    torch.save(state(), tmp_path / "pytorch_model.bin")
    assert_same(read_all(tmp_path), state())


def test_normalise_keys_strips_only_shared_prefixes() -> None:
    assert normalise_keys(["module.model.a", "module.model.b"]) == {
        "a": "module.model.a",
        "b": "module.model.b",
    }
    assert normalise_keys(["model.a", "b"]) == {"model.a": "model.a", "b": "b"}


# -- whole pickled modules --------------------------------------------------------------------


def test_pickled_image_encoder_keys_normalised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder()
    save_under_fake_module(enc, tmp_path / "enc.pt")
    assert "src_fake.modeling" not in sys.modules
    with open_checkpoint(tmp_path / "enc.pt") as r:
        assert r.format == "torch-module"
        keys = r.keys()
        got = {k: r.get(k) for k in keys}
    expected = {k.removeprefix("model."): v for k, v in enc.state_dict().items()}
    assert sorted(keys) == sorted(expected)  # non-persistent buffer left out, like state_dict()
    assert "scratch" not in keys
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert "src_fake.modeling" not in sys.modules


def test_pickled_module_legacy_format(tmp_path: Path) -> None:
    enc = ImageEncoder()
    # the legacy (non-zip) format goes through the same restricted path
    torch.save(enc, tmp_path / "enc_legacy.pt", _use_new_zipfile_serialization=False)
    got = read_all(tmp_path / "enc_legacy.pt")
    assert torch.equal(got["visual.0.weight"], enc.model.visual[0].weight.detach())


# -- malicious pickles ------------------------------------------------------------------------


class Payload:
    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, (f"touch {marker}",)),
        "subprocess.call": Payload(subprocess.call, (["touch", str(marker)],)),
        "subprocess.Popen": Payload(subprocess.Popen, (["touch", str(marker)],)),
        "eval": Payload(eval, (f"open({str(marker)!r}, 'w').close()",)),
        "exec": Payload(exec, (f"open({str(marker)!r}, 'w').close()",)),
    }


@pytest.mark.parametrize(
    "kind", ["os.system", "subprocess.call", "subprocess.Popen", "eval", "exec"]
)
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle", "nested-in-state-dict"])
def test_malicious_pickle_refused_and_not_run(tmp_path: Path, kind: str, container: str) -> None:
    marker = tmp_path / "pwned"
    p = payloads(marker)[kind]
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        torch.save(p, path)
    elif container == "raw-pickle":
        path.write_bytes(pickle.dumps(p, protocol=2))
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": p}, path)
    with pytest.raises(UnsafePickleError, match="refusing"):
        open_checkpoint(path)
    assert not marker.exists()


def test_malicious_pickle_cli_exit_1(tmp_path: Path, invoke) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": state(), "x": payloads(marker)["os.system"]}, evil)
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(state(), good)
    r = invoke("extract", good, evil)
    assert r.exit_code == 1
    assert "refusing" in r.stderr and "evil.pt" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not marker.exists()


def test_stub_runs_no_code() -> None:
    s = Stub(1, 2)
    assert isinstance(s(), Stub)
    with pytest.raises(TypeError):
        pickle.dumps(s)


# -- bad files --------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TvtoolError, match="not found"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(state(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(TvtoolError, match="truncated"):
        open_checkpoint(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(TvtoolError, match="not a readable safetensors"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "blob", [b"", b"garbage!", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!!!!"]
)
def test_garbage_safetensors(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(TvtoolError, match="not a readable safetensors"):
        open_checkpoint(path)


def test_garbage_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(TvtoolError, match="not a readable torch checkpoint"):
        open_checkpoint(path)


def test_safetensors_reader_reads_tensor_by_tensor_without_mmap(tmp_path: Path) -> None:
    """Each get() returns a fresh tensor owning its memory (no mapping of the whole file)."""
    sd = {
        "a": torch.randn(3, 4),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(1.0),
        "h": torch.randn(5).half(),
        "b": torch.tensor([True, False]),
    }
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(sd, path)
    with open_checkpoint(path) as r:
        a1, a2 = r.get("a"), r.get("a")
        assert a1.data_ptr() != a2.data_ptr()
        a1.add_(1)  # writable, and does not alias the file
        assert torch.equal(a2, sd["a"])
    assert_same(read_all(path), sd)


@pytest.mark.slow
def test_pickled_open_clip_image_encoder(tmp_path: Path, tiny_clip_config: Path) -> None:
    """As the task-vector code bases save it: an ImageEncoder holding an open_clip model (text
    tower deleted) and its torchvision preprocessing, pickled whole from a module `src.modeling`
    that does not exist when loading."""
    import open_clip

    open_clip.add_model_config(tiny_clip_config)
    clip, train_pre, val_pre = open_clip.create_model_and_transforms("tvtool-tiny")

    class OpenClipEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = clip
            self.train_preprocess, self.val_preprocess = train_pre, val_pre
            delattr(self.model, "transformer")

    enc = OpenClipEncoder()
    fake_pkg, fake = types.ModuleType("src"), types.ModuleType("src.modeling")
    fake.OpenClipEncoder = OpenClipEncoder
    OpenClipEncoder.__module__, OpenClipEncoder.__qualname__ = "src.modeling", "OpenClipEncoder"
    sys.modules.update({"src": fake_pkg, "src.modeling": fake})
    try:
        torch.save(enc, tmp_path / "zeroshot.pt")
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]
    expected = {k.removeprefix("model."): v for k, v in enc.state_dict().items()}
    got = read_all(tmp_path / "zeroshot.pt")
    assert sorted(got) == sorted(expected)
    assert any(k.startswith("visual.") for k in got) and "logit_scale" in got
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# -- strict header, compressed and crafted torch archives (issue 8) ----------------------------


def _rezip(src: Path, dst: Path, method: int) -> None:
    import zipfile

    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", method) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))


def test_deflated_torch_archive_is_read_correctly(tmp_path: Path) -> None:
    import zipfile

    sd = state()
    torch.save(sd, tmp_path / "plain.pt")
    _rezip(tmp_path / "plain.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(tmp_path / "deflated.pt") as z:  # the data really is compressed
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    assert_same(read_all(tmp_path / "deflated.pt"), sd)


def test_deflated_member_with_bad_crc_is_refused(tmp_path: Path) -> None:
    import zipfile

    torch.save(state(), tmp_path / "plain.pt")
    _rezip(tmp_path / "plain.pt", tmp_path / "d.pt", zipfile.ZIP_DEFLATED)
    raw = bytearray((tmp_path / "d.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "d.pt") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    cd = raw.rfind(info.filename.encode()) - 46  # its central-directory entry
    raw[cd + 16 : cd + 20] = (info.CRC ^ 0xFFFF).to_bytes(4, "little")
    (tmp_path / "d.pt").write_bytes(bytes(raw))
    with pytest.raises(TvtoolError, match="corrupt compressed member"):
        open_checkpoint(tmp_path / "d.pt")


def test_expanded_view_within_storage_is_read(tmp_path: Path) -> None:
    """Views that stay within their storage (tied weights, slices) are legitimate."""
    base = torch.randn(6, 4)
    torch.save({"emb": base, "head": base, "half": base[3:]}, tmp_path / "m.pt")
    got = read_all(tmp_path / "m.pt")
    assert torch.equal(got["head"], base) and torch.equal(got["half"], base[3:])


def test_stride0_view_is_refused_before_any_arithmetic(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1).expand(1000, 1000)}, tmp_path / "m.pt")
    with pytest.raises(TvtoolError, match="stride-0 or overlapping"):
        open_checkpoint(tmp_path / "m.pt")


def test_header_parser_agrees_with_safetensors_on_valid_files(tmp_path: Path) -> None:
    from tvtool.checkpoints.header import read_header

    sd = {**state(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.0)}
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors", {"k": "v"})
    h = read_header(tmp_path / "m.safetensors")
    assert h.metadata == {"k": "v"}
    reference = safetensors.safe_open(str(tmp_path / "m.safetensors"), "pt")
    assert set(h.entries) == set(reference.keys())
    for k, e in h.entries.items():
        assert list(e.shape) == list(reference.get_slice(k).get_shape())
        raw = (tmp_path / "m.safetensors").read_bytes()[e.begin : e.end]
        assert raw == sd[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    "shape, why",
    [("22", "shape must be a list"), ([2.0, 2.0], "integers"), ([True, True], "integers"),
     (["2", "2"], "integers"), ([0, 2**50], "out of range")],
)
def test_header_parser_refuses_lenient_shapes(tmp_path: Path, shape, why: str) -> None:
    from tvtool.checkpoints.header import HeaderError, read_header

    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}})
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(16))
    with pytest.raises(HeaderError, match=why):
        read_header(path)


def test_index_shard_outside_directory_is_not_read(tmp_path: Path) -> None:
    d, sd = _shards(tmp_path)
    index = d / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    outside = tmp_path / "outside.safetensors"
    safetensors.torch.save_file(sd, outside)
    doc["weight_map"] = {k: "../outside.safetensors" for k in sd}
    index.write_text(json.dumps(doc))
    with pytest.raises(TvtoolError, match="outside the index's directory"):
        open_checkpoint(index)


# -- content fingerprints (issue 8: the same weights in any format have one identity) ----------


def test_same_weights_in_every_format_have_one_fingerprint(tmp_path: Path) -> None:
    sd = state()
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    torch.save(sd, tmp_path / "m.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    d, _ = _shards(tmp_path)
    want = content_fingerprint(sd)
    for path in ("m.safetensors", "m.pt", "ddp.pt", "legacy.pt", d):
        with open_checkpoint(tmp_path / path) as r:
            assert r.fingerprint() == want, path


@pytest.mark.parametrize("change", ["value", "dtype", "name", "shape"])
def test_fingerprint_changes_with_the_content(tmp_path: Path, change: str) -> None:
    sd = state()
    other = dict(sd)
    if change == "value":
        other["visual.proj"] = sd["visual.proj"].clone()
        other["visual.proj"][0, 0] += 1e-6
    elif change == "dtype":
        other["visual.proj"] = sd["visual.proj"].double()
    elif change == "name":
        other["visual.proj2"] = other.pop("visual.proj")
    else:
        other["visual.proj"] = sd["visual.proj"].reshape(3, 4)
    safetensors.torch.save_file(sd, tmp_path / "a.safetensors")
    safetensors.torch.save_file(other, tmp_path / "b.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as a, open_checkpoint(
        tmp_path / "b.safetensors"
    ) as b:
        assert a.fingerprint() != b.fingerprint()


def test_fingerprint_after_a_pass_reads_nothing_again(tmp_path: Path) -> None:
    sd = state()
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as r:
        reads: list[str] = []
        inner = r._read
        r._read = lambda k: reads.append(k) or inner(k)  # type: ignore[method-assign]
        for k in r.keys()[:3]:
            r.get(k).add_(1)  # callers may update what they read in place
        fp = r.fingerprint()
        assert sorted(reads) == sorted(r.keys())  # the first three once, the others for the hash
    assert fp == content_fingerprint(sd)


def test_head_file_with_a_stride0_view_is_refused(tmp_path: Path) -> None:
    from tvtool.models.heads import _head_tensors

    torch.save(torch.zeros(1).expand(1000, 512), tmp_path / "head.pt")
    with pytest.raises(TvtoolError, match="stride-0 or overlapping"):
        _head_tensors(tmp_path / "head.pt")
    torch.save(torch.randn(3, 4), tmp_path / "ok.pt")
    assert _head_tensors(tmp_path / "ok.pt")[0].shape == (3, 4)
