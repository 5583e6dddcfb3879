"""`store import` of hostile bundles: all or nothing, one line, bounded memory and disk.

Bundles are built here member by member (plain or gzip tar), so every lie a bundle can tell
(names, sizes, digests, claims, order, duplicates, links, headers) is tried on its own."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_hostile_store import one_line_error, put_tensors, safetensors_bytes, snapshot
from tvtool.store import Store
from tvtool.store.manifest import Manifest, canonical_json


class Zeros(io.RawIOBase):
    """`n` zero bytes as a file, never held in memory."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def manifest_bytes(digest: str, size: int, **fields) -> bytes:
    m = Manifest(digest=digest, size=size, kind=fields.pop("kind", "vector"),
                 format=fields.pop("format", "json"), **fields)
    return canonical_json(m.model_dump(mode="json"))


def write_bundle(path: Path, members: list[tuple[str, object, int | None]], *,
                 gz: bool = False, kind: bytes = tarfile.REGTYPE) -> Path:
    """members: (name, bytes or file-like, size or None for len(bytes))."""
    raw = gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")
    with raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data, size in members:
            info = tarfile.TarInfo(name)
            info.size = len(data) if size is None else size
            info.type = kind if name.startswith("link") else tarfile.REGTYPE
            if info.type == tarfile.SYMTYPE:
                info.linkname, info.size = "/etc/passwd", 0
            tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data)
    return path


def index(refs: dict[str, str], objects: list[str]) -> tuple[str, bytes, None]:
    return ("bundle.json", canonical_json({"format": 1, "refs": refs, "objects": objects}), None)


def obj(data: bytes, **fields) -> tuple[str, list[tuple[str, bytes, None]]]:
    d = hashlib.sha256(data).hexdigest()
    return d, [(f"objects/{d}.json", manifest_bytes(d, len(data), **fields), None),
               (f"objects/{d}", data, None)]


@pytest.fixture
def target(tmp_path: Path) -> Store:
    """A store with one named object, to prove an import that fails changes nothing."""
    store = Store(tmp_path / "target")
    m = store.put_json({"v": "here"}, "vector")
    store.set_ref("here", m.digest)
    return store


def refused(invoke, target: Store, bundle: Path, code: int, needle: str) -> None:
    before = snapshot(target.root)
    line = one_line_error(invoke("store", "import", bundle, "--store", target.root), code)
    assert needle in line, line
    assert snapshot(target.root) == before  # nothing imported, nothing left in tmp/
    assert list(target.tmp_dir.iterdir()) == []


def test_conflicting_refs_import_nothing(invoke, target, tmp_path) -> None:
    d1, m1 = obj(b'{"a":1}\n')
    d2, m2 = obj(b'{"b":1}\n')
    bundle = write_bundle(tmp_path / "b.tar", [index({"a": d1, "a/b": d2}, [d1, d2]), *m1, *m2])
    refused(invoke, target, bundle, 1, "conflict")
    target.set_ref("x", target.resolve("here"))
    bundle = write_bundle(tmp_path / "c.tar", [index({"x/y": d1}, [d1]), *m1])
    refused(invoke, target, bundle, 1, "ref 'x' exists")


@pytest.mark.parametrize("name", ["k.tmp", "ab" * 32, "deadbeef00", "../up", "a//b", "x\n"])
def test_bad_ref_names_in_bundles(invoke, target, tmp_path, name: str) -> None:
    d, m = obj(b'{"a":1}\n')
    bundle = write_bundle(tmp_path / "b.tar", [index({name: d}, [d]), *m])
    refused(invoke, target, bundle, 1, "invalid ref name")


def test_lying_members(invoke, target, tmp_path) -> None:
    d, m = obj(b'{"a":1}\n')
    e, n = obj(b'{"e":1}\n')
    cases = {
        "dup": ([index({"r": d}, [d]), *m, m[1]], 3, "a second member"),
        "extra": ([index({"r": d}, [d]), *m, ("../../evil", b"x", None)], 3, "unexpected"),
        "order": ([index({"r": d}, [d]), m[1], m[0]], 3, "before its manifest"),
        "lacks": ([index({"r": d}, [d]), m[0]], 3, "lacks"),
        "digest": ([index({"r": d}, [d]), m[0], (m[1][0], b'{"a":2}\n', None)], 3, "corrupt"),
        "other": ([index({"r": d}, [d]), (m[0][0], n[0][1], None), m[1]], 3, "another object"),
        "first": ([*m, index({"r": d}, [d])], 1, "not a tvtool bundle"),
        "link": ([index({}, []), ("link", b"", None)], 1, "not a regular file"),
        "input": ([index({"r": d}, [d]), (m[0][0], manifest_bytes(d, 8, inputs=[e]), None),
                   m[1]], 3, "needs"),
    }
    for key, (members, code, needle) in cases.items():
        kind = tarfile.SYMTYPE if key == "link" else tarfile.REGTYPE
        bundle = write_bundle(tmp_path / f"{key}.tar", members, kind=kind)
        refused(invoke, target, bundle, code, needle)


def test_forged_tensor_claims(invoke, target, tmp_path) -> None:
    data = safetensors_bytes({"w": ("F32", [2, 3])})
    d = hashlib.sha256(data).hexdigest()
    forged = manifest_bytes(d, len(data), format="safetensors", numel=6, dtype="F32",
                            tensors=[{"name": "w", "dtype": "F32", "shape": [3, 2]}])
    bundle = write_bundle(tmp_path / "b.tar", [index({"w": d}, [d]),
                                               (f"objects/{d}.json", forged, None),
                                               (f"objects/{d}", data, None)])
    refused(invoke, target, bundle, 3, "shape [3, 2]")


def test_lenient_headers_in_bundles_are_refused(invoke, target, tmp_path) -> None:
    """Data whose digest is right but whose header is malformed (a shape given as "22")."""
    raw = json.dumps({"w": {"dtype": "F32", "shape": "22", "data_offsets": [0, 16]}}).encode()
    data = len(raw).to_bytes(8, "little") + raw + bytes(16)
    d = hashlib.sha256(data).hexdigest()
    claims = manifest_bytes(d, len(data), format="safetensors", numel=4, dtype="F32",
                            tensors=[{"name": "w", "dtype": "F32", "shape": [2, 2]}])
    bundle = write_bundle(tmp_path / "b.tar", [index({"w": d}, [d]),
                                               (f"objects/{d}.json", claims, None),
                                               (f"objects/{d}", data, None)])
    refused(invoke, target, bundle, 3, d[:12])


def test_round_trip_of_a_real_tensor_object(invoke, tmp_path) -> None:
    src = Store()
    m = put_tensors(src, {"w": ("F32", [2, 3]), "b": ("BF16", [3])})
    src.set_ref("ns/w", m.digest)
    bundle = tmp_path / "b.tar"
    assert invoke("store", "export", "ns/", "-o", bundle).exit_code == 0
    gz = tmp_path / "b.tar.gz"
    gz.write_bytes(gzip.compress(bundle.read_bytes()))
    for i, path in enumerate((bundle, gz)):
        other = Store(tmp_path / f"other{i}")
        r = invoke("store", "import", path, "--store", other.root)
        assert r.exit_code == 0, r.stderr
        assert other.refs() == {"ns/w": m.digest}
        assert invoke("store", "verify", "--store", other.root).exit_code == 0
        assert list(other.tmp_dir.iterdir()) == []


def test_size_lies_fail_before_reading_the_data(invoke, target, tmp_path) -> None:
    """A 2 GB member whose manifest says 8 bytes is refused at its header: no data read."""
    data = b'{"a":1}\n'
    d = hashlib.sha256(data).hexdigest()
    members = [index({"r": d}, [d]), (f"objects/{d}.json", manifest_bytes(d, len(data)), None)]
    plain = write_bundle(tmp_path / "head.tar", members).read_bytes().rstrip(b"\0")
    plain += bytes(-len(plain) % 512)
    info = tarfile.TarInfo(f"objects/{d}")
    info.size = 2 << 30
    bundle = tmp_path / "bomb.tar.gz"  # the header only: the 2 GB never follow
    bundle.write_bytes(gzip.compress(plain + info.tobuf(tarfile.PAX_FORMAT)))
    t = time.monotonic()
    refused(invoke, target, bundle, 3, "its manifest 8")
    assert time.monotonic() - t < 5


def test_huge_declared_sizes_are_refused_up_front(invoke, target, tmp_path) -> None:
    data = b'{"a":1}\n'
    d = hashlib.sha256(data).hexdigest()
    bundle = write_bundle(tmp_path / "big.tar", [index({"r": d}, [d]),
                                                 (f"objects/{d}.json", manifest_bytes(d, 1 << 60),
                                                  None)])
    refused(invoke, target, bundle, 1, "are free")
    with open(tmp_path / "hdr.tar", "wb") as f:  # a pax header claiming 1 GB, gzip'd to bytes
        info = tarfile.TarInfo("././@PaxHeader")
        info.size, info.type = 1 << 30, tarfile.XHDTYPE
        f.write(gzip.compress(info.tobuf(tarfile.USTAR_FORMAT)))
    refused(invoke, target, tmp_path / "hdr.tar", 1, "not a tvtool bundle")


_IMPORT_RSS = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from tvtool.errors import TvtoolError
    from tvtool.store import Store
    from tvtool.store.bundle_import import import_bundle
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        import_bundle(Store(sys.argv[1]), Path(sys.argv[2]))
        print("imported")
    except TvtoolError as e:
        print("refused", e.exit_code)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """
)


@pytest.mark.slow
def test_gzip_bomb_bounded_memory_and_disk(tmp_path, target) -> None:
    """128 MB of zeros in ~130 kB of gzip, whose digest is a lie: refused after hashing it,
    with nothing written and peak memory far below the data's size."""
    n = 128 << 20
    d = "0" * 64
    bundle = write_bundle(tmp_path / "bomb.tar.gz", [
        index({"r": d}, [d]), (f"objects/{d}.json", manifest_bytes(d, n), None),
        (f"objects/{d}", Zeros(n), n)], gz=True)
    assert bundle.stat().st_size < 2 << 20
    before = snapshot(target.root)
    r = subprocess.run([sys.executable, "-c", _IMPORT_RSS, str(target.root), str(bundle)],
                       capture_output=True, text=True, timeout=60)
    outcome, grown_mb = r.stdout.split()[:2], int(r.stdout.split()[-1])
    assert outcome == ["refused", "3"], r.stdout + r.stderr
    assert grown_mb < 64, f"peak RSS grew by {grown_mb} MB"
    assert snapshot(target.root) == before and list(target.tmp_dir.iterdir()) == []


def test_import_is_all_or_nothing_when_a_ref_exists(invoke, target, tmp_path) -> None:
    d1, m1 = obj(b'{"a":1}\n')
    bundle = write_bundle(tmp_path / "b.tar", [index({"new": d1, "here": d1}, [d1]), *m1])
    refused(invoke, target, bundle, 1, "--force")
    r = invoke("store", "import", bundle, "--store", target.root, "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["new"] == [d1]
    assert target.refs() == {"here": d1, "new": d1}


def test_gc_sweeps_stale_staging_but_not_a_live_import(tmp_path) -> None:
    import os

    from tvtool.store.files import create_locked
    from tvtool.store.maintenance import gc

    store = Store()
    store.init()
    stale, live = store.tmp_dir / "a.import", store.tmp_dir / "b.import"
    run = store.tmp_dir / "compose-runs" / "abc"  # compose's resumable run: not gc's to take
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"state")
    for d in (stale, live):
        d.mkdir()
        (d / ("0" * 64)).write_bytes(b"half an object")
    (stale / "lock").write_bytes(b"")
    with create_locked(live / "lock"):
        old = time.time() - 7200
        for d in (stale, live, run, run.parent):
            os.utime(d, (old, old))
        assert gc(store, 3600, dry_run=True).tmp_removed == 1 and stale.exists()
        assert gc(store, 3600).tmp_removed == 1
        assert not stale.exists() and live.exists()
        assert (run / "checkpoint.pt").exists()


def _tar_bytes(fmt: int, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_stream_reads_what_tarfile_writes(tmp_path, fmt) -> None:
    from tvtool.store.tarstream import TarStream, open_stream

    long = "d/" + "n" * 150 if fmt != tarfile.USTAR_FORMAT else "d/" + "n" * 90
    members = {"a": b"x" * 1000, long: b"", "ünï": b"yz" * 700, "e": b"\0" * 512}
    if fmt != tarfile.PAX_FORMAT:
        members.pop("ünï")
    raw = _tar_bytes(fmt, members)
    for i, blob in enumerate((raw, gzip.compress(raw))):
        path = tmp_path / f"t{fmt}{i}"
        path.write_bytes(blob)
        with open_stream(path) as f:
            tar = TarStream(f, str(path))
            got = {m.name: tar.read(m.size + 10) for m in tar.members()}
        assert got == members


def test_tar_stream_base256_sizes_and_checksums(tmp_path) -> None:
    from tvtool.store.tarstream import TarFormatError, TarStream

    info = tarfile.TarInfo("big")
    info.size = 5
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b"\x80" + (5).to_bytes(11, "big")  # GNU base-256, as for sizes >= 8 GiB
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    good = bytes(block) + b"hello".ljust(512, b"\0") + bytes(1024)
    tar = TarStream(io.BytesIO(good), "t")
    assert [(m.name, m.size, tar.read(99)) for m in tar.members()] == [("big", 5, b"hello")]
    bad = bytearray(good)
    bad[0] ^= 1  # the name changes, the checksum does not
    with pytest.raises(TarFormatError, match="checksum"):
        list(TarStream(io.BytesIO(bytes(bad)), "t").members())
    with pytest.raises(TarFormatError, match="truncated"):
        t = TarStream(io.BytesIO(good[:600]), "t")
        for m in t.members():
            t.read(m.size)
