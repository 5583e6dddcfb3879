"""`tvtool merge` and `tvtool provenance` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvtool.checkpoints.readers import open_checkpoint
from tvtool.checkpoints.writer import save_safetensors
from tvtool.cli.merge_cmd import split_terms
from tvtool.store.store import Store
from tvtool.vectors.stored import save_tensor_object

SHAPES = {"enc.weight": (6, 4), "enc.bias": (6,), "head.weight": (3, 6)}


@pytest.fixture
def setup(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_safetensors(tmp_path / "base.safetensors", base)
    store = Store()
    taus = {}
    for name in ("cars", "mnist"):
        taus[name] = {k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()}
        store.set_ref(name, save_tensor_object(store, "vector", taus[name]).digest)
    return tmp_path, store, base, taus


def _load(path: Path) -> dict:
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


def test_split_terms_moves_negated_terms_behind_double_dash():
    arity = {"--base": 1, "--scale": 1, "-q": 0, "--quiet": 0, "-o": 1, "--out": 1}
    args = ["--base", "b", "cars", "-mnist:0.5", "--scale", "-0.5", "-q", "-o", "-x.st", "dtd"]
    assert split_terms(args, arity) == [
        "--base", "b", "--scale", "-0.5", "-q", "-o", "-x.st", "--", "cars", "-mnist:0.5", "dtd"
    ]
    assert split_terms(["--scale=-1", "--bogus", "-qnli"], arity) == [
        "--scale=-1", "--bogus", "--", "-qnli"
    ]
    assert split_terms(["--base", "b", "--", "-a"], arity) == ["--base", "b", "--", "-a"]


def test_merge_with_negated_term_quiet_prints_digest(invoke, setup):
    tmp, store, base, taus = setup
    out = tmp / "m.safetensors"
    r = invoke("merge", "--base", tmp / "base.safetensors", "-o", out, "cars", "-mnist:0.5", "-q")
    assert r.exit_code == 0, r.stderr
    digest = r.stdout.strip()
    assert len(digest) == 64 and store.manifest(digest).kind == "merge"
    got = _load(out)
    for k in SHAPES:
        ref = base[k] + 0.3 * taus["cars"][k] - 0.5 * taus["mnist"][k]
        assert torch.allclose(got[k], ref, atol=1e-6)


def test_merge_json_document_and_provenance(invoke, setup):
    tmp, store, base, taus = setup
    out = tmp / "m.safetensors"
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", out, "--method", "ties",
               "--density", "0.5", "cars", "mnist:2", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dry_run"] is False and doc["method"] == "ties"
    assert [t["weight"] for t in doc["terms"]] == [1.0, 2.0]
    assert [t["name"] for t in doc["terms"]] == ["cars", "mnist"]
    assert doc["tensors"] == {"total": 3, "touched": 3, "copied": 0}
    assert doc["params"]["scale"] == 1.0 and doc["params"]["scope"] == "global"
    assert doc["size"] == out.stat().st_size

    p = invoke("provenance", out, "--json")
    assert p.exit_code == 0, p.stderr
    prov = json.loads(p.stdout)
    assert prov["tvtool"] is True
    assert prov["provenance"]["merge"] == doc["merge"]
    assert prov["provenance"]["vectors"] == [store.resolve("cars"), store.resolve("mnist")]
    assert prov["provenance"]["params"]["density"] == 0.5
    assert prov["metadata"]["format"] == "pt"
    h = invoke("provenance", out)
    assert h.exit_code == 0 and h.stdout.strip() == doc["merge"]
    assert "cars" in h.stderr and "ties" in h.stderr


def test_dry_run_writes_nothing_and_shows_the_plan(invoke, setup):
    tmp, store, base, taus = setup
    out = tmp / "m.safetensors"
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", out, "cars", "mnist",
               "--include", "^enc", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dry_run"] is True and doc["tensors"]["touched"] == 2
    assert [t["weight"] for t in doc["terms"]] == [0.3, 0.3]
    assert doc["files"] == [str(out)] and doc["size"] > 0
    assert not out.exists() and not any(tmp.glob(".m.safetensors*"))
    h = invoke("merge", "--base", tmp / "base.safetensors", "--out", out, "cars", "--dry-run")
    assert h.exit_code == 0 and h.stdout == ""
    assert "dry run: not written" in h.stderr and str(out) in " ".join(h.stderr.split())
    assert not store.has(doc["merge"])  # nothing recorded


def test_existing_output_needs_force_and_reruns_are_byte_identical(invoke, setup):
    tmp, *_ = setup
    out = tmp / "m.safetensors"
    args = ("merge", "--base", tmp / "base.safetensors", "--out", out, "cars", "-q")
    assert invoke(*args).exit_code == 0
    first = out.read_bytes()
    r = invoke(*args)
    assert r.exit_code == 1 and "--force" in r.stderr
    assert invoke(*args, "--force").exit_code == 0
    assert out.read_bytes() == first


def test_shards_and_provenance_of_the_index(invoke, setup):
    tmp, *_ = setup
    d = tmp / "sharded"
    d.mkdir()
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", d, "cars",
               "--shard-size", "100B", "-q")
    assert r.exit_code == 0, r.stderr
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and len(files) == 3
    assert index["metadata"]["tvtool.merge"] == r.stdout.strip()
    p = invoke("provenance", d, "--json")
    assert json.loads(p.stdout)["provenance"]["merge"] == r.stdout.strip()
    single = tmp / "single.safetensors"
    invoke("merge", "--base", tmp / "base.safetensors", "--out", single, "cars", "-q")
    a, b = _load(d / "model.safetensors.index.json"), _load(single)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_recipe_rebuild_from_the_store(invoke, setup):
    tmp, *_ = setup
    out = tmp / "m.safetensors"
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", out, "--method", "dare",
               "--drop", "0.3", "--seed", "7", "cars", "-mnist", "-q")
    assert r.exit_code == 0, r.stderr
    again = tmp / "again.safetensors"
    r2 = invoke("merge", "--base", tmp / "base.safetensors", "--out", again,
                "--recipe", r.stdout.strip()[:12], "-q")
    assert r2.exit_code == 0, r2.stderr
    assert again.read_bytes() == out.read_bytes()
    bad = invoke("merge", "--base", tmp / "base.safetensors", "--out", tmp / "x.safetensors",
                 "--recipe", r.stdout.strip(), "cars")
    assert bad.exit_code == 1


@pytest.mark.parametrize("args,message", [
    (["cars:abc"], "not a number"),
    (["nope"], "no ref or object"),
    ([], "nothing to merge"),
    (["cars", "--method", "ties", "--density", "1.5"], "--density"),
    (["cars", "--shard-size", "lots"], "invalid size"),
    (["cars", "--dtype", "fp8"], "unknown dtype"),
])
def test_bad_inputs_exit_1_with_one_line(invoke, setup, args, message):
    tmp, *_ = setup
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", tmp / "x.safetensors", *args)
    assert r.exit_code == 1, r.stdout
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp / "x.safetensors").exists()


def test_missing_tensors_name_offenders_unless_allowed(invoke, setup):
    tmp, store, base, taus = setup
    odd = {**taus["cars"], "extra.weight": torch.ones(3)}
    store.set_ref("odd", save_tensor_object(store, "vector", odd).digest)
    args = ("merge", "--base", tmp / "base.safetensors", "--out", tmp / "x.safetensors", "odd")
    r = invoke(*args)
    assert r.exit_code == 1 and "extra.weight" in r.stderr
    r = invoke(*args, "--allow-missing", "-q")
    assert r.exit_code == 0 and "extra.weight" in r.stderr and "skipped" in r.stderr


def test_usage_errors_and_help(invoke, setup):
    tmp, *_ = setup
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", tmp / "x.safetensors",
               "cars", "--method", "avg")
    assert r.exit_code == 2
    h = invoke("merge", "--help")
    assert h.exit_code == 0
    text = " ".join(h.stdout.split())
    assert "1.0 for one vector and 0.3 for several" in text
    assert "two extra streamed reads" in text
    p = invoke("provenance", tmp / "base.safetensors", "--json")
    assert p.exit_code == 0 and json.loads(p.stdout)["tvtool"] is False
    assert invoke("provenance", tmp / "nothing.safetensors").exit_code == 1


def test_coefs_and_mask_options(invoke, setup):
    from tvtool.vectors.blocks import CoefsLayout, make_blocks

    tmp, store, base, taus = setup
    digests = [store.resolve("cars"), store.resolve("mnist")]
    layout = CoefsLayout(vectors=digests, blocks=make_blocks(SHAPES, "task"), granularity="task")
    coefs = torch.tensor([[0.25], [-0.5]])
    c = save_tensor_object(store, "coefs", {"coefs": coefs}, inputs=digests,
                           params={"layout": layout.model_dump()})
    out = tmp / "c.safetensors"
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", out, "--coefs",
               c.digest[:10], "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["coefs"] == c.digest
    got = _load(out)
    for k in SHAPES:
        ref = base[k] + 0.25 * taus["cars"][k] - 0.5 * taus["mnist"][k]
        assert torch.allclose(got[k], ref, atol=1e-6)
    assert json.loads(invoke("provenance", out, "--json").stdout)["provenance"]["coefs"] == c.digest

    m = {k: torch.ones(s, dtype=torch.bool) for k, s in SHAPES.items()}
    m["enc.weight"][0] = False
    mk = save_tensor_object(store, "mask", m, params={"vector": digests[1], "density": 0.9})
    out = tmp / "m.safetensors"
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", out, "--method", "mask",
               "-mnist", "--mask", mk.digest, "-q")
    assert r.exit_code == 0, r.stderr
    got = _load(out)
    assert torch.equal(got["enc.weight"][0], base["enc.weight"][0])
    assert torch.allclose(got["enc.bias"], base["enc.bias"] - taus["mnist"]["enc.bias"])


def test_refuses_a_vector_from_another_base_unless_allowed(invoke, setup):
    from tvtool.vectors.extract import extract_vector

    tmp, store, base, taus = setup
    save_safetensors(tmp / "ft.safetensors", {k: v + 0.01 for k, v in base.items()})
    save_safetensors(tmp / "other.safetensors", {k: v * 2 for k, v in base.items()})
    d = extract_vector(store, tmp / "base.safetensors", tmp / "ft.safetensors").digest
    same = invoke("merge", "--base", tmp / "base.safetensors", "-o", tmp / "a.safetensors", d,
                  "-q")
    assert same.exit_code == 0 and "another base" not in same.stderr
    other = invoke("merge", "--base", tmp / "other.safetensors", "-o", tmp / "b.safetensors", d,
                   "-q")
    assert other.exit_code == 1 and "--allow-other-base" in other.stderr
    assert "Traceback" not in other.stderr and not (tmp / "b.safetensors").exists()
    other = invoke("merge", "--base", tmp / "other.safetensors", "-o", tmp / "b.safetensors", d,
                   "-q", "--allow-other-base")
    assert other.exit_code == 0 and "extracted from another base" in other.stderr


def test_config_file_yaml_and_json_match_the_command_line(invoke, setup):
    tmp, store, base, taus = setup
    cli = invoke("merge", "--base", tmp / "base.safetensors", "-o", tmp / "cli.safetensors",
                 "--method", "ties", "--density", "0.5", "--no-normalize", "cars", "-mnist:0.5",
                 "--ties-scope", "tensor", "--json")  # mergekit's spelling: mergekit's per tensor
    assert cli.exit_code == 0, cli.stderr
    (tmp / "r.yml").write_text(
        "base_model: base.safetensors\nmerge_method: ties\nparameters: {density: 0.5, "
        "normalize: false}\nmodels:\n  - model: cars\n  - model: -mnist\n"
        "    parameters: {weight: 0.5}\nout: cfg.safetensors\nname: merges/cfg\n")
    r = invoke("merge", "--config", tmp / "r.yml", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["merge"] == json.loads(cli.stdout)["merge"]  # the same recipe
    assert (tmp / "cfg.safetensors").read_bytes() == (tmp / "cli.safetensors").read_bytes()
    assert store.resolve("merges/cfg") == doc["merge"]
    (tmp / "r.json").write_text(json.dumps({
        "base": "base.safetensors", "method": "ties", "params": {"density": 0.5,
                                                                 "normalize": False,
                                                                 "scope": "tensor"},
        "terms": ["cars", "-mnist:0.5"]}))
    r = invoke("merge", "--config", tmp / "r.json", "-o", tmp / "j.safetensors", "-q")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == doc["merge"]


@pytest.mark.parametrize("text,message", [
    ("method: ties\nparams: {density: 3}\nterms: [cars]\nbase: base.safetensors\n", "--density"),
    ("method: ties\nparams: {drop: 0.5}\nterms: [cars]\nbase: base.safetensors\n",
     "does not apply"),
    ("method: avg\nterms: [cars]\nbase: base.safetensors\n", "unknown method"),
    ("terms: [cars]\nbase: base.safetensors\nbogus: 1\n", "bogus"),
    ("terms: ['cars:nan']\nbase: base.safetensors\n", "not a number"),
    ("models: [{model: cars, parameters: {density: 0.2}}]\nbase: base.safetensors\n",
     "other than weight"),
    ("[1, 2", "not valid YAML"),
    ("terms: [cars]\n", "--base is required"),
])
def test_config_errors_are_one_line(invoke, setup, text, message):
    tmp, *_ = setup
    (tmp / "bad.yml").write_text(text)
    r = invoke("merge", "--config", tmp / "bad.yml", "-o", tmp / "x.safetensors")
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp / "x.safetensors").exists()


@pytest.mark.parametrize("args,message", [
    (["cars", "--scale", "1e308"], "--scale"),
    (["cars:1e308"], "finite number"),
    (["cars", "--method", "ties", "--drop", "0.5"], "--drop does not apply"),
    (["cars", "--method", "slerp"], "exactly 2"),
    (["cars", "mnist", "--method", "della", "--density", "0.1", "--epsilon", "0.2"],
     "density - epsilon"),
    (["cars", "--method", "dare", "--density", "0.5"], "--then ties"),
])
def test_method_option_errors(invoke, setup, args, message):
    tmp, *_ = setup
    r = invoke("merge", "--base", tmp / "base.safetensors", "--out", tmp / "x.safetensors", *args)
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_crafted_recipe_on_the_command_line(invoke, setup):
    tmp, store, *_ = setup
    d = store.put_json({"format": "tvtool.merge/2", "base": "0" * 64, "method": {"method": "x"},
                        "scale": 1, "terms": []}, kind="merge").digest
    r = invoke("merge", "--base", tmp / "base.safetensors", "-o", tmp / "x.safetensors",
               "--recipe", d)
    assert r.exit_code == 1 and "not a valid merge recipe" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_slerp_and_checkpoint_terms_from_the_cli(invoke, setup):
    tmp, store, base, taus = setup
    save_safetensors(tmp / "ft.safetensors", {k: v + taus["cars"][k] for k, v in base.items()})
    r = invoke("merge", "--base", tmp / "base.safetensors", "-o", tmp / "s.safetensors",
               "--method", "slerp", "--t", "0.0", tmp / "ft.safetensors", "mnist", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["terms"][0]["checkpoint"] == str((tmp / "ft.safetensors").resolve())
    got = _load(tmp / "s.safetensors")
    for k in SHAPES:  # t = 0: the first term's model
        assert torch.allclose(got[k], base[k] + taus["cars"][k], atol=1e-5)
