"""`tvtool store ...` from the command line (in-process with CliRunner)."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import time
from pathlib import Path

import pytest

from tvtool.store import Store
from tvtool.store.manifest import canonical_json

TWIN_A, TWIN_B, TWIN_PREFIX = {"n": 56409}, {"n": 64313}, "09026a42"  # see test_store.py


@pytest.fixture
def populated() -> dict[str, str]:
    """Two named vectors (one namespaced), a merge made from them, and an untagged object."""
    store = Store()
    cars = store.put_json({"v": "cars"}, "vector", numel=10, dtype="float32")
    dtd = store.put_json({"v": "dtd"}, "vector", numel=20, dtype="float16")
    merged = store.put_json({"v": "merged"}, "merge", inputs=[cars.digest, dtd.digest])
    loose = store.put_json({"v": "loose"}, "selection")
    store.set_ref("cars", cars.digest)
    store.set_ref("vit/dtd", dtd.digest)
    store.set_ref("merged", merged.digest)
    return {"cars": cars.digest, "dtd": dtd.digest, "merged": merged.digest, "loose": loose.digest}


def _make_old(digest: str, seconds: float = 7200) -> None:
    store, t = Store(), time.time() - seconds
    for p in (store.blob_path(digest), store.manifest_path(digest)):
        os.utime(p, (t, t))


def test_ls_json_quiet_and_table(invoke, populated) -> None:
    r = invoke("store", "ls", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    rows = {o["digest"]: o for o in doc["objects"]}
    assert set(rows) == set(populated.values())
    assert rows[populated["cars"]]["names"] == ["cars"]
    assert rows[populated["dtd"]]["names"] == ["vit/dtd"]
    assert rows[populated["loose"]]["names"] == []
    assert rows[populated["dtd"]]["numel"] == 20 and rows[populated["dtd"]]["dtype"] == "float16"
    assert rows[populated["merged"]]["kind"] == "merge"

    r = invoke("store", "ls", "--kind", "vector", "-q")
    assert r.stdout.split() == ["cars", "vit/dtd"]

    r = invoke("store", "ls")  # rows are data: tab-separated on stdout, digests whole
    assert r.exit_code == 0
    header, *lines = r.stdout.splitlines()
    assert header.split("\t") == ["name", "digest", "kind", "numel", "size", "dtype", "created"]
    by_digest = {ln.split("\t")[1]: ln.split("\t") for ln in lines}
    assert set(by_digest) == set(populated.values())
    assert by_digest[populated["loose"]][0] == "(untagged)"
    assert by_digest[populated["merged"]][2] == "merge"
    assert [ln.split("\t")[0] for ln in lines if "\tvector\t" in ln] == ["cars", "vit/dtd"]


def test_ls_empty_store(invoke, isolated_store) -> None:
    r = invoke("store", "ls")
    assert r.exit_code == 0 and "no objects" in r.stderr
    assert json.loads(invoke("store", "ls", "--json").stdout)["objects"] == []
    assert not isolated_store.exists()  # reading never creates a store


def test_show_json_quiet_and_human(invoke, populated) -> None:
    r = invoke("store", "show", "merged", "--json")
    doc = json.loads(r.stdout)
    assert doc["digest"] == populated["merged"] and doc["names"] == ["merged"]
    assert doc["inputs"] == [populated["cars"], populated["dtd"]] and doc["kind"] == "merge"
    assert invoke("store", "show", populated["cars"][:10], "-q").stdout == populated["cars"] + "\n"
    r = invoke("store", "show", "merged")
    assert r.stdout == "" and populated["merged"] in r.stderr and "vit/dtd" in r.stderr


def test_show_coefs_table(invoke) -> None:
    store = Store()
    a, b = store.put_json({"v": "a"}, "vector"), store.put_json({"v": "b"}, "vector")
    store.set_ref("a", a.digest)
    store.set_ref("b", b.digest)
    coefs = [0.25, 0.75, 0.5, -1.0, 2.0, 3.0]  # [T=2, G=3]: block x (1 group), block y (2)
    header = json.dumps({"coefs": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}})
    data = struct.pack("<Q", len(header)) + header.encode() + struct.pack("<6f", *coefs)
    layout = {"vectors": [a.digest, b.digest],
              "blocks": [{"name": "x", "keys": ["x"]}, {"name": "y", "keys": ["y"], "groups": 2}]}
    m = store.put_bytes(data, kind="coefs", format="safetensors", inputs=[a.digest, b.digest],
                        params={"layout": layout})
    r = invoke("store", "show", m.digest[:8])
    assert r.exit_code == 0
    lines = {line.split()[0]: line.split() for line in r.stderr.splitlines() if line.strip()}
    assert lines["x"][1:] == ["0.2500", "-1.0000"]
    assert lines["y"][-2:] == ["0.6250", "2.5000"]  # means of the two groups per vector


def test_resolution_errors(invoke) -> None:
    store = Store()
    a, b = store.put_json(TWIN_A, "vector"), store.put_json(TWIN_B, "vector")
    r = invoke("store", "show", "nope")
    assert r.exit_code == 1 and r.stderr.startswith("Error: no ref or object named 'nope'")
    r = invoke("store", "show", TWIN_PREFIX)
    assert r.exit_code == 1 and "ambiguous" in r.stderr
    assert a.digest[:16] in r.stderr and b.digest[:16] in r.stderr
    r = invoke("store", "show", "abc")
    assert r.exit_code == 1 and "at least 8" in r.stderr


def test_tag_and_move(invoke, populated) -> None:
    r = invoke("store", "tag", populated["loose"][:8], "team/loose", "-q")
    assert r.exit_code == 0 and r.stdout == "team/loose\n"
    assert Store().get_ref("team/loose") == populated["loose"]
    r = invoke("store", "tag", "cars", "team/loose")  # another ref works as the target
    assert r.exit_code == 1 and "--force" in r.stderr
    assert Store().get_ref("team/loose") == populated["loose"]
    r = invoke("store", "tag", "cars", "team/loose", "--force")
    assert r.exit_code == 0 and "moved" in r.stderr
    assert Store().get_ref("team/loose") == populated["cars"]
    assert invoke("store", "tag", "cars", "bad name").exit_code == 1
    assert invoke("store", "tag", "cars", "../escape").exit_code == 1
    assert invoke("store", "tag", "cars", "team").exit_code == 1  # a namespace already


def test_rm_dry_run_confirm_and_yes(invoke, populated) -> None:
    r = invoke("store", "rm", "cars", "--dry-run")
    assert r.exit_code == 0 and "would remove" in r.stderr and Store().get_ref("cars")
    r = invoke("store", "rm", "cars", input="n\n")
    assert r.exit_code == 1 and Store().get_ref("cars")
    r = invoke("store", "rm", "cars", input="y\n")
    assert r.exit_code == 0 and Store().get_ref("cars") is None
    assert Store().has(populated["cars"])  # the object waits for gc
    r = invoke("store", "rm", "vit/dtd", "--yes")
    assert r.exit_code == 0 and Store().refs() == {"merged": populated["merged"]}
    assert not (Store().refs_dir / "vit").exists()
    r = invoke("store", "rm", "nope", "--yes")
    assert r.exit_code == 1 and "no ref named 'nope'" in r.stderr


def test_verify_ok_and_corrupt(invoke, populated) -> None:
    r = invoke("store", "verify")
    assert r.exit_code == 0 and "4 objects ok" in r.stderr
    blob = Store().blob_path(populated["dtd"])
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes().replace(b"dtd", b"DTD"))
    r = invoke("store", "verify")
    assert r.exit_code == 3
    assert populated["dtd"] in r.stderr and "vit/dtd" in r.stderr
    assert "1 of 4 objects" in r.stderr
    r = invoke("store", "verify", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 3 and doc["ok"] is False and doc["checked"] == 4
    assert [p["digest"] for p in doc["problems"]] == [populated["dtd"]]


def test_gc_dry_run_grace_and_reachability(invoke, populated) -> None:
    for d in populated.values():
        _make_old(d)
    r = invoke("store", "gc", "--dry-run", "--grace", "0", "--json")
    doc = json.loads(r.stdout)
    assert doc["removed"] == [populated["loose"]] and doc["dry_run"] is True
    assert Store().has(populated["loose"])
    r = invoke("store", "gc", "--grace", "3h")
    assert r.exit_code == 0 and Store().has(populated["loose"])
    invoke("store", "rm", "vit/dtd", "--yes")  # still reached as an input of `merged`
    r = invoke("store", "gc")
    assert r.exit_code == 0 and "removed 1 object" in r.stderr
    assert set(Store().iter_digests()) == {populated["cars"], populated["dtd"], populated["merged"]}
    assert invoke("store", "verify").exit_code == 0
    r = invoke("store", "gc", "--grace", "soon")
    assert r.exit_code == 2 and "invalid duration" in r.stderr


def test_export_import_round_trip(invoke, populated, tmp_path: Path) -> None:
    bundle, other = tmp_path / "b.tar", tmp_path / "other-store"
    r = invoke("store", "export", "merged", "vit/", "-o", bundle, "--json")
    doc = json.loads(r.stdout)
    assert doc["refs"] == {"merged": populated["merged"], "vit/dtd": populated["dtd"]}
    assert set(doc["objects"]) == {populated["merged"], populated["cars"], populated["dtd"]}
    r = invoke("store", "export", "cars", "-o", bundle)
    assert r.exit_code == 1 and "--force" in r.stderr

    r = invoke("store", "import", bundle, "--store", other, "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["new"]) == 3
    second = Store(other)
    assert second.refs() == {"merged": populated["merged"], "vit/dtd": populated["dtd"]}
    for d in (populated["merged"], populated["cars"], populated["dtd"]):
        assert second.blob_path(d).read_bytes() == Store().blob_path(d).read_bytes()
        assert second.manifest(d) == Store().manifest(d)
    assert invoke("store", "verify", "--store", other).exit_code == 0
    r = invoke("store", "import", bundle, "--store", other, "-q")  # again: nothing new
    assert r.exit_code == 0 and len(r.stdout.split()) == 3

    invoke("store", "tag", populated["cars"], "merged", "--force", "--store", other)
    r = invoke("store", "import", bundle, "--store", other)
    assert r.exit_code == 1 and "--force" in r.stderr
    assert second.get_ref("merged") == populated["cars"]
    r = invoke("store", "import", bundle, "--store", other, "--force")
    assert r.exit_code == 0 and second.get_ref("merged") == populated["merged"]


def test_import_rejects_corrupt_bundles(invoke, populated, tmp_path: Path) -> None:
    bundle, other = tmp_path / "b.tar", tmp_path / "other-store"
    assert invoke("store", "export", "merged", "-o", bundle).exit_code == 0
    raw = bundle.read_bytes()
    pos = raw.index(canonical_json({"v": "dtd"}))  # inside the data of one member
    bad = tmp_path / "bad.tar"
    bad.write_bytes(raw[:pos] + raw[pos:].replace(b"dtd", b"DTD", 1))
    r = invoke("store", "import", bad, "--store", other)
    assert r.exit_code == 3 and populated["dtd"][:12] in r.stderr
    assert list(Store(other).iter_digests()) == [] and Store(other).refs() == {}
    assert not any(Store(other).tmp_dir.iterdir())

    truncated = tmp_path / "short.tar"
    truncated.write_bytes(raw[: len(raw) // 2])
    r = invoke("store", "import", truncated, "--store", other)
    assert r.exit_code in (1, 3) and r.stderr.startswith("Error:")
    assert list(Store(other).iter_digests()) == []

    lying = tmp_path / "lying.tar"
    with tarfile.open(bundle) as src, tarfile.open(lying, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "bundle.json":
                index = json.loads(data)
                index["refs"]["evil"] = "0" * 64
                data = canonical_json(index)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    r = invoke("store", "import", lying, "--store", other)
    assert r.exit_code == 3 and "evil" in r.stderr

    junk = tmp_path / "junk.tar"
    junk.write_text("not a tar")
    r = invoke("store", "import", junk, "--store", other)
    assert r.exit_code == 1 and "not a tvtool bundle" in r.stderr
    assert invoke("store", "import", tmp_path / "missing.tar").exit_code == 1


def test_corrupt_manifest_and_dangling_ref(invoke, populated) -> None:
    store = Store()
    mpath = store.manifest_path(populated["cars"])
    os.chmod(mpath, 0o644)
    mpath.write_text("{not json")
    (store.refs_dir / "ghost").write_text("f" * 64 + "\n")
    r = invoke("store", "show", "cars")
    assert r.exit_code == 3 and "corrupt" in r.stderr
    rows = {o["digest"]: o for o in json.loads(invoke("store", "ls", "--json").stdout)["objects"]}
    assert rows[populated["cars"]]["kind"] == "corrupt"
    assert "ghost" in invoke("store", "ls").stderr
    r = invoke("store", "verify", "--json")
    assert r.exit_code == 3
    problems = {p["digest"]: p for p in json.loads(r.stdout)["problems"]}
    assert set(problems) == {populated["cars"], "f" * 64}
    assert problems["f" * 64]["dangling_ref"] == "ghost"
    assert "1 of 4 objects" in r.stderr and "1 ref(s)" in r.stderr

