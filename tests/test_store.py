"""The store core (torch-free): objects, dedup, names, verify, gc, crash and concurrency safety."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tvtool.errors import TvtoolError
from tvtool.store import Store, canonical_json
from tvtool.store.maintenance import gc, parse_duration, verify
from tvtool.store.peek import read_small_tensor

# Two JSON documents whose sha256 digests share their first 8 hex characters (found offline by
# a birthday search), so a real ambiguous 8-character prefix can be tested without fakes.
TWIN_A, TWIN_B, TWIN_PREFIX = {"n": 56409}, {"n": 64313}, "09026a42"


def age(store: Store, digest: str, seconds: float = 7200) -> None:
    """Make an object look `seconds` old to gc."""
    t = time.time() - seconds
    for p in (store.blob_path(digest), store.manifest_path(digest)):
        os.utime(p, (t, t))


def flip_byte(path: Path, offset: int = 0) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_json_round_trip_and_layout(isolated_store: Path) -> None:
    store = Store()
    assert store.root == isolated_store
    m = store.put_json({"b": [1, 2], "a": "x"}, "selection", params={"k": 1})
    data = canonical_json({"a": "x", "b": [1, 2]})
    assert m.digest == hashlib.sha256(data).hexdigest()
    assert m.size == len(data) and m.kind == "selection" and m.format == "json"
    blob = isolated_store / "objects" / "sha256" / m.digest[:2] / m.digest[2:]
    assert blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert stat.S_IMODE(store.manifest_path(m.digest).stat().st_mode) == 0o444
    assert store.read_json(m.digest) == {"a": "x", "b": [1, 2]}
    assert store.manifest(m.digest) == m
    assert (isolated_store / "store.json").is_file()
    assert list(store.iter_digests()) == [m.digest]
    assert list(store.tmp_dir.iterdir()) == []


def test_dedup_keeps_first_manifest() -> None:
    store = Store()
    first = store.put_bytes(b"same bytes", kind="vector", format="json", params={"who": "first"})
    second = store.put_bytes(b"same bytes", kind="mask", format="json", params={"who": "second"})
    assert first.digest == second.digest
    assert second.params == {"who": "first"} and second.kind == "vector"
    assert store.manifest(first.digest).params == {"who": "first"}
    assert list(store.iter_digests()) == [first.digest]
    assert list(store.tmp_dir.iterdir()) == []


def test_failed_write_leaves_nothing() -> None:
    store = Store()
    with pytest.raises(RuntimeError), store.writer() as w:
        w.write(b"partial")
        raise RuntimeError("boom")
    with pytest.raises(ValueError), store.writer() as w:  # bad manifest: rejected before placing
        w.write(b"data")
        w.commit({"kind": "no-such-kind", "format": "json"})
    assert list(store.iter_digests()) == []
    assert list(store.tmp_dir.iterdir()) == []
    assert not any(p.is_file() for p in store.objects_dir.rglob("*"))


def test_resolve_ref_digest_and_prefixes() -> None:
    store = Store()
    m = store.put_json({"x": 1}, "vector")
    store.set_ref("cars", m.digest)
    assert store.resolve("cars") == m.digest
    assert store.resolve(m.digest) == m.digest
    assert store.resolve("sha256:" + m.digest) == m.digest
    assert store.resolve(m.digest[:8]) == m.digest
    assert store.resolve(m.digest[:8].upper()) == m.digest
    with pytest.raises(TvtoolError, match="at least 8 hex"):
        store.resolve(m.digest[:7])
    with pytest.raises(TvtoolError, match="no ref or object named 'dogs'"):
        store.resolve("dogs")
    with pytest.raises(TvtoolError, match="is a vector object, expected coefs"):
        store.resolve("cars", kind="coefs")
    assert store.resolve("cars", kind=("coefs", "vector")) == m.digest


def test_ambiguous_prefix_names_candidates() -> None:
    store = Store()
    a, b = store.put_json(TWIN_A, "vector"), store.put_json(TWIN_B, "vector")
    assert a.digest[:8] == b.digest[:8] == TWIN_PREFIX
    with pytest.raises(TvtoolError, match="ambiguous") as e:
        store.resolve(TWIN_PREFIX)
    assert a.digest[:16] in str(e.value) and b.digest[:16] in str(e.value)
    n = next(i for i in range(8, 64) if a.digest[:i] != b.digest[:i])
    assert store.resolve(a.digest[:n]) == a.digest
    assert store.resolve(b.digest[:n]) == b.digest


def test_namespaced_refs() -> None:
    store = Store()
    a, b = store.put_json({"a": 1}, "vector"), store.put_json({"b": 1}, "vector")
    store.set_ref("vit-b-32/cars", a.digest)
    store.set_ref("vit-b-32/dtd", b.digest)
    assert store.refs() == {"vit-b-32/cars": a.digest, "vit-b-32/dtd": b.digest}
    assert store.resolve("vit-b-32/dtd") == b.digest
    assert store.names_for(a.digest) == ["vit-b-32/cars"]
    assert store.display_name(b.digest) == "vit-b-32/dtd"
    with pytest.raises(TvtoolError, match="namespace"):
        store.set_ref("vit-b-32", a.digest)
    with pytest.raises(TvtoolError, match="already points"):
        store.set_ref("vit-b-32/cars", b.digest, force=False)
    assert store.set_ref("vit-b-32/cars", b.digest, force=True) == a.digest
    store.remove_ref("vit-b-32/cars")
    store.remove_ref("vit-b-32/dtd")
    assert store.refs() == {} and list(store.refs_dir.iterdir()) == []
    with pytest.raises(TvtoolError, match="no ref named"):
        store.remove_ref("vit-b-32/dtd")


@pytest.mark.parametrize("bad", ["../x", "a/../b", "/abs", "a//b", "-x", "a b", ""])
def test_invalid_ref_names(bad: str) -> None:
    store = Store()
    m = store.put_json({"a": 1}, "vector")
    with pytest.raises(TvtoolError):
        store.set_ref(bad, m.digest)
    assert store.get_ref(bad) is None


def test_verify_names_every_corrupt_object() -> None:
    store = Store()
    good = store.put_json({"ok": 1}, "vector")
    flipped = store.put_json({"flip": 1}, "vector")
    gone = store.put_json({"gone": 1}, "vector")
    bad_manifest = store.put_json({"manifest": 1}, "vector")
    store.set_ref("flipped", flipped.digest)
    assert verify(store) == (4, [])
    flip_byte(store.blob_path(flipped.digest), 3)
    store.blob_path(gone.digest).unlink()
    flip_byte(store.manifest_path(bad_manifest.digest), 0)
    (store.refs_dir / "dangling").write_text("e" * 64 + "\n")
    checked, problems = verify(store)
    assert checked == 4
    named = {p.digest: p.what for p in problems}
    assert set(named) == {flipped.digest, gone.digest, bad_manifest.digest, "e" * 64}
    assert "hashes to" in named[flipped.digest]
    assert "missing" in named[gone.digest]
    assert "dangling" in named["e" * 64]
    assert good.digest not in named


def test_parse_duration() -> None:
    assert parse_duration("0") == 0
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("1h") == 3600
    assert parse_duration("2d") == 172800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    for bad in ("", "h", "1x", "-1h", "1 h", "10m5"):
        with pytest.raises(TvtoolError):
            parse_duration(bad)


def test_gc_keeps_what_refs_reach_and_their_inputs() -> None:
    store = Store()
    leaf = store.put_json({"leaf": 1}, "vector")
    mid = store.put_json({"mid": 1}, "coefs", inputs=[leaf.digest])
    top = store.put_json({"top": 1}, "merge", inputs=[mid.digest])
    junk = store.put_json({"junk": 1}, "vector")
    fresh_input = store.put_json({"fresh input": 1}, "vector")
    fresh = store.put_json({"fresh": 1}, "merge", inputs=[fresh_input.digest])
    store.set_ref("result", top.digest)
    for m in (leaf, mid, top, junk, fresh_input):
        age(store, m.digest)

    report = gc(store, 3600, dry_run=True)
    assert report.removed == [junk.digest] and report.kept_recent == [fresh.digest]
    assert store.has(junk.digest)

    report = gc(store, 3600)
    assert report.removed == [junk.digest] and report.reclaimed_bytes == junk.size
    assert not store.has(junk.digest) and not store.blob_path(junk.digest).exists()
    # the young untagged object keeps its (old) input alive
    assert {leaf.digest, mid.digest, top.digest, fresh.digest, fresh_input.digest} == set(
        store.iter_digests()
    )
    gc(store, 0)
    assert set(store.iter_digests()) == {leaf.digest, mid.digest, top.digest}
    assert verify(store)[1] == []


def test_gc_spares_a_write_in_flight() -> None:
    store = Store()
    with store.writer() as w:
        w.write(b"in flight")
        report = gc(store, 0)
        assert report.tmp_removed == 0 and w.path.exists()
        m = w.commit({"kind": "vector", "format": "json"})
    assert store.has(m.digest)
    assert verify(store) == (1, [])


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from tvtool.store import Store
    store = Store(sys.argv[1])
    with store.writer() as w:
        chunk = b"x" * (1 << 20)
        for i in range(10_000):
            w.write(chunk)
            if i == 3:
                print("writing", flush=True)
            time.sleep(0.01)
        w.commit({"kind": "vector", "format": "safetensors"})
    """
)

_CRASH_BEFORE_MANIFEST = textwrap.dedent(
    """
    import os, signal, sys
    from tvtool.store import Store
    store = Store(sys.argv[1])
    store._write_manifest = lambda m: os.kill(os.getpid(), signal.SIGKILL)
    store.put_bytes(PAYLOAD, kind="vector", format="safetensors")
    """
)
# a valid safetensors file with no tensors (a 300 kB header, padded with spaces)
PAYLOAD = struct.pack("<Q", 299_992) + b"{}" + b" " * 299_990
_CRASH_BEFORE_MANIFEST = (
    'import struct\nPAYLOAD = struct.pack("<Q", 299_992) + b"{}" + b" " * 299_990\n'
    + _CRASH_BEFORE_MANIFEST
)


def test_killed_mid_write_leaves_nothing(isolated_store: Path, invoke) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(isolated_store)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    store = Store()
    assert [p.suffix for p in store.tmp_dir.iterdir()] == [".part"]
    assert list(store.iter_digests()) == []
    r = invoke("store", "verify")
    assert r.exit_code == 0 and "0 objects ok" in r.stderr
    assert "0 temp file" in invoke("store", "gc").stderr  # the grace period protects it...
    assert [p.suffix for p in store.tmp_dir.iterdir()] == [".part"]
    r = invoke("store", "gc", "--grace", "0")  # ...until there is none
    assert r.exit_code == 0 and "1 temp file" in r.stderr
    assert list(store.tmp_dir.iterdir()) == []


def test_killed_before_manifest_is_absent_then_rewritable(isolated_store: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CRASH_BEFORE_MANIFEST, str(isolated_store)])
    assert proc.returncode == -signal.SIGKILL
    store = Store()
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert store.blob_path(digest).exists() and not store.has(digest)  # orphan data only
    assert verify(store) == (0, [])
    with pytest.raises(TvtoolError):
        store.resolve(digest)
    # gc with a grace period leaves the orphan; with none it sweeps it
    assert gc(store, 3600).removed == []
    assert gc(store, 0).removed == [digest] and not store.blob_path(digest).exists()
    # the same crash again, then the write succeeds on top of the orphan
    subprocess.run([sys.executable, "-c", _CRASH_BEFORE_MANIFEST, str(isolated_store)])
    m = store.put_bytes(PAYLOAD, kind="vector", format="safetensors")
    assert m.digest == digest and verify(store) == (1, [])


def _concurrent_writer(root: str, barrier, index: int) -> None:
    store = Store(root)
    with store.writer() as w:
        for _ in range(8):
            w.write(b"z" * (1 << 18))
        barrier.wait()
        w.commit({"kind": "vector", "format": "json", "params": {"writer": index}})


@pytest.mark.slow
def test_concurrent_writers_make_one_object(isolated_store: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(isolated_store), barrier, i))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = Store()
    digests = list(store.iter_digests())
    assert digests == [hashlib.sha256(b"z" * (1 << 21)).hexdigest()]
    assert store.manifest(digests[0]).params["writer"] in range(4)
    assert verify(store) == (1, [])
    assert list(store.tmp_dir.iterdir()) == []


def _safetensors(name: str, dtype: str, shape: list[int], payload: bytes) -> bytes:
    import json

    header = json.dumps(
        {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(payload)]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + payload


@pytest.mark.parametrize(
    ("dtype", "pack"),
    [
        ("F32", lambda v: struct.pack("<4f", *v)),
        ("F16", lambda v: struct.pack("<4e", *v)),
        ("BF16", lambda v: b"".join(struct.pack("<f", x)[2:] for x in v)),
    ],
)
def test_peek_reads_small_tensors(tmp_path: Path, dtype: str, pack) -> None:
    values = [0.5, -1.25, 2.0, 0.0]
    path = tmp_path / "t.safetensors"
    path.write_bytes(_safetensors("coefs", dtype, [2, 2], pack(values)))
    assert read_small_tensor(path, "coefs") == ([2, 2], values)
    with pytest.raises(TvtoolError):
        read_small_tensor(path, "other")
