"""The store against hostile and careless input: each case checks the exit code, a one-line
message (no traceback), and that no object, ref or file is lost or left behind."""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest

from tvtool.store import Store
from tvtool.store.maintenance import gc, verify

HEX64 = "ab" * 32


def one_line_error(r, code: int = 1) -> str:
    """The result failed with `code` and a single `Error:` line on stderr."""
    assert r.exit_code == code, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert "Traceback" not in r.stderr
    return re.sub(r"\S*pytest-of-\S*", "<path>", lines[0])  # test names are in the paths


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a store (path -> bytes), to prove nothing changed."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "refs.lock"}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], meta: str = "") -> bytes:
    """A valid safetensors file of zero-filled tensors (torch-free)."""
    width = {"F32": 4, "F16": 2, "BF16": 2}
    header: dict = {"__metadata__": {"m": meta}}
    pos = 0
    for name, (dtype, shape) in tensors.items():
        n = width[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(pos)


def put_tensors(store: Store, tensors: dict[str, tuple[str, list[int]]], meta: str = "",
                **fields):
    """A safetensors object whose manifest tells the truth about its tensors."""
    numel = 0
    for _, shape in tensors.values():
        n = 1
        for s in shape:
            n *= s
        numel += n
    return store.put_bytes(
        safetensors_bytes(tensors, meta), kind=fields.pop("kind", "vector"), format="safetensors",
        tensors=[{"name": k, "dtype": d, "shape": s} for k, (d, s) in tensors.items()],
        numel=numel, dtype=",".join(sorted({d for d, _ in tensors.values()})), **fields,
    )


def make_old(store: Store, digest: str, seconds: float = 7200) -> None:
    t = time.time() - seconds
    for p in (store.blob_path(digest), store.manifest_path(digest)):
        if p.exists():
            os.utime(p, (t, t))


def edit_manifest(store: Store, digest: str, **changes) -> None:
    path = store.manifest_path(digest)
    doc = json.loads(path.read_bytes())
    doc.update(changes)
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))


# -- refs -------------------------------------------------------------------------------------

BAD_NAMES = [
    "k.tmp", "ns/k.tmp", "k.tmp/x", HEX64, "deadbeef", "DEADBEEF12", "sha256:" + HEX64,
    "a" * 256, "ns/" + "b" * 256, "/".join(["c" * 200] * 6), "a//b", "../x", "a/../b", "a/./b",
    "x\n", "x\r", "x\x1b[2J", "x\x00y", "a/", "/a", ".hidden", "-x", "a b", "naïve", "\udcff",
]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_hostile_ref_names_are_refused(invoke, isolated_store, bad: str) -> None:
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    store.set_ref("keep", m.digest)
    before = snapshot(isolated_store)
    line = one_line_error(invoke("store", "tag", "keep", "--", bad))
    assert "invalid ref name" in line
    assert snapshot(isolated_store) == before and store.refs() == {"keep": m.digest}


@pytest.mark.parametrize("good", ["z" * 255, "abc", "cafe", "cafe1234x", "v1.0/cars",
                                  "ns/" + "y" * 255, "1234567"])
def test_edge_ref_names_round_trip(invoke, good: str) -> None:
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    r = invoke("store", "tag", m.digest, good)
    assert r.exit_code == 0, r.stderr
    assert store.resolve(good) == m.digest and store.refs() == {good: m.digest}
    assert invoke("store", "verify").exit_code == 0
    assert json.loads(invoke("store", "ls", "--json").stdout)["objects"][0]["names"] == [good]


def test_conflicting_namespace_refs(invoke) -> None:
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    store.set_ref("a", m.digest)
    assert "ref 'a' exists" in one_line_error(invoke("store", "tag", "a", "a/b"))
    store.set_ref("n/x", m.digest)
    assert "namespace" in one_line_error(invoke("store", "tag", "a", "n"))
    assert store.refs() == {"a": m.digest, "n/x": m.digest}


def test_digests_win_over_legacy_refs(invoke) -> None:
    """A ref file named like another object's digest prefix (made by hand or an old version)
    never shadows that object; it is reported and can be renamed and removed."""
    store = Store()
    a, b = store.put_json({"v": "a"}, "vector"), store.put_json({"v": "b"}, "vector")
    store.set_ref("a", a.digest)
    (store.refs_dir / b.digest[:10]).write_text(a.digest + "\n")  # shadow attempt
    (store.refs_dir / "old.tmp").write_text(a.digest + "\n")  # ends in .tmp
    assert store.resolve(b.digest[:10]) == b.digest
    assert store.resolve(b.digest) == b.digest
    assert store.resolve("old.tmp") == a.digest
    r = invoke("store", "verify", "--json")
    assert r.exit_code == 0
    warned = {w["dangling_ref"] for w in json.loads(r.stdout)["warnings"]}
    assert warned == {b.digest[:10], "old.tmp"}
    assert {b.digest[:10], "old.tmp", "a"} <= set(store.refs())
    # `rm` of a digest-like string means the digest: it removes the refs naming b (none)
    assert "no ref names object" in one_line_error(invoke("store", "rm", b.digest[:10], "--yes"))
    assert invoke("store", "rm", "old.tmp", "--yes").exit_code == 0
    assert "old.tmp" not in store.refs()


def test_legacy_tmp_ref_is_listed_protected_and_verified(invoke) -> None:
    """The reported data loss: `k.tmp` named the object but ls/gc/verify skipped it."""
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    store.set_ref("x", m.digest)
    (store.refs_dir / "k.tmp").write_text(m.digest + "\n")
    make_old(store, m.digest)
    rows = json.loads(invoke("store", "ls", "--json").stdout)["objects"]
    assert rows[0]["names"] == ["k.tmp", "x"]
    assert invoke("store", "rm", "x", "--yes").exit_code == 0
    assert invoke("store", "gc", "--grace", "0").exit_code == 0
    assert store.has(m.digest) and store.resolve("k.tmp") == m.digest
    store.blob_path(m.digest).unlink()
    store.manifest_path(m.digest).unlink()
    r = invoke("store", "verify")
    assert r.exit_code == 3 and "k.tmp" in r.stderr


def test_rm_by_digest_removes_every_ref_naming_it(invoke) -> None:
    store = Store()
    m, other = store.put_json({"v": 1}, "vector"), store.put_json({"v": 2}, "vector")
    for n in ("one", "ns/two"):
        store.set_ref(n, m.digest)
    store.set_ref("other", other.digest)
    r = invoke("store", "rm", m.digest[:12], "--dry-run")
    assert r.exit_code == 0 and "one" in r.stderr and "ns/two" in r.stderr
    assert len(store.refs()) == 3
    assert invoke("store", "rm", m.digest, "--yes").exit_code == 0
    assert store.refs() == {"other": other.digest} and store.has(m.digest)
    assert "no ref names" in one_line_error(invoke("store", "rm", m.digest, "--yes"))


def test_corrupt_ref_content(invoke) -> None:
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    store.set_ref("ok", m.digest)
    (store.refs_dir / "junk").write_text("../../etc/passwd\n")
    assert "holds no digest" in one_line_error(invoke("store", "show", "junk"), 3)
    r = invoke("store", "verify")
    assert r.exit_code == 3 and "junk" in r.stderr
    assert store.resolve("ok") == m.digest
    (store.refs_dir / "junk").write_text("\x1b]0;pwned\x07\x1b[2J[red]x[/red]\n")
    for args in (("store", "verify"), ("store", "ls")):
        r = invoke(*args)
        assert "junk" in r.stderr and "\x1b" not in r.stderr and "\x07" not in r.stderr


def test_special_files_under_refs(invoke) -> None:
    """A fifo under refs/ would block a reader forever: it is reported, never opened."""
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    store.set_ref("ok", m.digest)
    loose = store.put_json({"v": "loose"}, "vector")
    make_old(store, loose.digest)
    os.mkfifo(store.refs_dir / "pipe")
    assert store.refs() == {"ok": m.digest, "pipe": ""}
    r = invoke("store", "verify")
    assert r.exit_code == 3 and "pipe" in r.stderr
    r = invoke("store", "gc", "--grace", "0", "--json")  # a root is unknown: nothing is swept
    assert r.exit_code == 0 and json.loads(r.stdout)["corrupt_refs"] == ["pipe"]
    assert store.has(m.digest) and store.has(loose.digest)
    assert "no ref" in one_line_error(invoke("store", "show", "pipe"))


def test_legacy_names_do_not_travel(invoke, tmp_path) -> None:
    store = Store()
    m = store.put_json({"v": 1}, "vector")
    (store.refs_dir / "old.tmp").write_text(m.digest + "\n")
    line = one_line_error(invoke("store", "export", "old.tmp", "-o", tmp_path / "b.tar"))
    assert "invalid ref name 'old.tmp'" in line and not (tmp_path / "b.tar").exists()


def test_damaged_store_format_file(invoke, isolated_store) -> None:
    m = Store().put_json({"v": 1}, "vector")
    (isolated_store / "store.json").write_text("{nope")
    before = snapshot(isolated_store)
    line = one_line_error(invoke("store", "tag", m.digest, "y"))
    assert "<path> is unreadable: Expecting" in line
    (isolated_store / "store.json").write_text('{"format": 99}')
    assert "format 99" in one_line_error(invoke("store", "gc"))
    assert {k for k in snapshot(isolated_store) if k != "store.json"} == {
        k for k in before if k != "store.json"}


# -- verify -----------------------------------------------------------------------------------


def test_verify_checks_manifest_claims_against_the_data(invoke) -> None:
    store = Store()
    objs = {k: put_tensors(store, {"w": ("F32", [2, 3]), "b": ("F16", [3])}, meta=k)
            for k in ("shape", "dtype", "numel", "name", "extra", "ok")}
    assert verify(store) == (6, [])
    edit_manifest(store, objs["shape"].digest,
                  tensors=[{"name": "w", "dtype": "F32", "shape": [3, 2]},
                           {"name": "b", "dtype": "F16", "shape": [3]}])
    edit_manifest(store, objs["dtype"].digest, dtype="F32")
    edit_manifest(store, objs["numel"].digest, numel=7)
    edit_manifest(store, objs["name"].digest,
                  tensors=[{"name": "w2", "dtype": "F32", "shape": [2, 3]},
                           {"name": "b", "dtype": "F16", "shape": [3]}])
    edit_manifest(store, objs["extra"].digest, tensors=[{"name": "w", "dtype": "F32",
                                                         "shape": [2, 3]}])
    r = invoke("store", "verify", "--json")
    assert r.exit_code == 3
    found: dict[str, list[str]] = {}
    for p in json.loads(r.stdout)["problems"]:
        found.setdefault(p["digest"], []).append(p["problem"])
    assert set(found) == {objs[k].digest for k in ("shape", "dtype", "numel", "name", "extra")}
    assert any("shape [3, 2]" in w for w in found[objs["shape"].digest])
    assert any("dtype F32" in w for w in found[objs["dtype"].digest])
    assert any("numel 7" in w for w in found[objs["numel"].digest])
    assert any("'b'" in w for w in found[objs["extra"].digest])
    assert "5 of 6 objects" in r.stderr


def test_verify_and_gc_with_a_lost_manifest(invoke) -> None:
    store = Store()
    kept = put_tensors(store, {"w": ("F32", [4])})
    loose = store.put_json({"v": "loose"}, "vector")
    store.set_ref("kept", kept.digest)
    for m in (kept, loose):
        make_old(store, m.digest)
        store.manifest_path(m.digest).unlink()
    r = invoke("store", "verify", "--json")
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert [(p["digest"], p["names"]) for p in doc["problems"]] == [(kept.digest, ["kept"])]
    assert "manifest missing" in doc["problems"][0]["problem"]
    assert [w["digest"] for w in doc["warnings"]] == [loose.digest]
    r = invoke("store", "gc", "--grace", "0", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["kept_damaged"] == [kept.digest]
    assert store.blob_path(kept.digest).exists()  # refs are the roots: the data stays
    assert store.blob_path(loose.digest).exists()  # and while inputs are unknown, all stays
    assert invoke("store", "rm", "kept", "--yes").exit_code == 0  # the user gives it up
    assert invoke("store", "gc", "--grace", "0").exit_code == 0
    assert not store.blob_path(kept.digest).exists()
    assert not store.blob_path(loose.digest).exists()
    assert invoke("store", "verify").exit_code == 0


def test_verify_finds_missing_inputs_and_data(invoke) -> None:
    store = Store()
    vec = put_tensors(store, {"w": ("F32", [4])})
    merged = store.put_json({"recipe": 1}, "merge", inputs=[vec.digest])
    store.set_ref("merged", merged.digest)
    coefs = store.put_json({"c": 1}, "coefs", params={"layout": {"vectors": ["cd" * 32]}})
    store.set_ref("coefs", coefs.digest)
    store.blob_path(vec.digest).unlink()
    store.manifest_path(vec.digest).unlink()
    nodata = store.put_json({"v": "no data"}, "vector")
    store.blob_path(nodata.digest).unlink()
    r = invoke("store", "verify", "--json")
    assert r.exit_code == 3
    probs = {(p["digest"], p["problem"]) for p in json.loads(r.stdout)["problems"]}
    assert (merged.digest, f"input {vec.digest[:12]} is missing") in probs
    assert (coefs.digest, f"input {'cd' * 6} is missing") in probs
    assert (nodata.digest, "data blob missing") in probs


def test_gc_keeps_data_when_a_manifest_is_corrupt() -> None:
    store = Store()
    leaf = put_tensors(store, {"w": ("F32", [4])})
    top = store.put_json({"top": 1}, "merge", inputs=[leaf.digest])
    store.set_ref("top", top.digest)
    for m in (leaf, top):
        make_old(store, m.digest)
    path = store.manifest_path(top.digest)
    os.chmod(path, 0o644)
    path.write_text("{not json")
    loose = store.put_json({"v": "loose"}, "vector")
    make_old(store, loose.digest)
    report = gc(store, 0)  # top's inputs are unknown now: nothing is swept until verify is clean
    assert report.kept_damaged == [top.digest] and report.removed == []
    assert store.blob_path(top.digest).exists() and store.has(leaf.digest)
    assert store.has(loose.digest)
