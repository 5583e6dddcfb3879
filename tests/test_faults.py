"""Crash safety: extract, merge and import killed (SIGKILL, SIGTERM) at seeded random moments,
and gc racing extracts. After every kill the store verifies, every ref resolves, outputs are
whole or absent, and what is left over (temp files, part files) is swept by gc / clean.

Commands run in forked children of this process (torch already imported), so a kill can land
anywhere in the command itself rather than in interpreter start-up."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from tvtool.checkpoints.writer import save_safetensors
from tvtool.store import Store
from tvtool.store.maintenance import gc, verify
from tvtool.store.parts import is_part_file, stale_parts

ROUNDS = 6
_CLI: list = []


def _cli():
    """The click command, built once here and inherited by every child (building it costs
    more than the commands themselves), with the commands' lazy imports done up front."""
    if not _CLI:
        import importlib

        from typer.main import get_command

        from tvtool.cli.app import app

        for m in ("tvtool.cli.output", "tvtool.vectors.extract", "tvtool.vectors.filters",
                  "tvtool.vectors.merge", "tvtool.vectors.recipe", "tvtool.vectors.terms",
                  "tvtool.store.bundle", "tvtool.store.bundle_import", "rich.table"):
            importlib.import_module(m)
        _CLI.append(get_command(app))
    return _CLI[0]


def fork_cli(*args: object) -> int:
    """Run `tvtool ARGS` in a forked child (output discarded); returns its pid."""
    cli = _cli()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            # An OpenMP pool the parent already started does not survive fork: a parallel op in
            # the child would wait for it forever. One thread runs every op inline.
            torch.set_num_threads(1)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            rv = cli.main(args=[str(a) for a in args], prog_name="tvtool",
                          standalone_mode=False)
            code = rv if isinstance(rv, int) else 0
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    return pid


def run_cli(*args: object) -> int:
    _, status = os.waitpid(fork_cli(*args), 0)
    return os.waitstatus_to_exitcode(status)


def timed(*args: object) -> float:
    """Run a command to completion (it must succeed); how long it took, so that kills can be
    spread over a whole run whatever the machine's speed."""
    t = time.monotonic()
    assert run_cli(*args) == 0
    return time.monotonic() - t


def kill_after(pid: int, delay: float, sig: int) -> int:
    """Signal the child after `delay` seconds (unless it is done); its exit code (or -sig)."""
    end = time.monotonic() + delay
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def assert_consistent(store: Store) -> None:
    """verify passes and every ref resolves to a readable object."""
    checked, problems = verify(store)
    assert problems == [], problems
    for name in store.refs():
        assert store.manifest(store.resolve(name)).digest == store.resolve(name)


def assert_swept(store: Store, keep: tuple[str, ...] = ()) -> None:
    """gc leaves no temp files behind (but `keep`), keeps every ref, and the store verifies."""
    refs = store.refs()
    gc(store, 0)
    left = [p.name for p in store.tmp_dir.iterdir()] if store.tmp_dir.exists() else []
    assert [n for n in left if n not in keep] == []
    assert store.refs() == refs
    assert_consistent(store)


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and three fine-tuned checkpoints of 16 x 256 x 256 fp32 (4 MB each)."""
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.weight": torch.randn(256, 256, generator=g) for i in range(16)}
    save_safetensors(tmp_path / "base.safetensors", base)
    fts = []
    for j in range(3):
        fts.append(tmp_path / f"ft{j}.safetensors")
        save_safetensors(fts[-1], {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                   for k, v in base.items()})
    return tmp_path / "base.safetensors", fts


def extract_all(base: Path, fts: list[Path], store: Store, name: str) -> Store:
    """Every fine-tuned checkpoint's vector, named `name.format(index)`."""
    for j, ft in enumerate(fts):
        assert run_cli("extract", base, ft, "--name", name.format(j), "--store", store.root) == 0
    return store


def delays(seed: int, duration: float) -> list[float]:
    """Seeded kill times spread over a run of `duration` seconds (a few land after it)."""
    rng = random.Random(seed)
    return [rng.uniform(0, 1.1 * duration) for _ in range(ROUNDS)]


def kill_rounds(
    seed: int,
    duration: float,
    sigs: Sequence[int],
    args_of: Callable[[int], list],
    store_of: Callable[[int], Store],
) -> Iterator[tuple[int, int]]:
    """The kill loop: for round i at each seeded kill time, fork `tvtool *args_of(i)`, send it
    `sigs[i % len(sigs)]` after that delay, check that it exited 0 or by that signal and that
    `store_of(i)` stays consistent; yields (i, exit code) for the test's own checks."""
    for i, delay in enumerate(delays(seed, duration)):
        sig = sigs[i % len(sigs)]
        code = kill_after(fork_cli(*args_of(i)), delay, sig)
        assert code in (0, -sig), code
        assert_consistent(store_of(i))
        yield i, code


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_killed_extracts(checkpoints, tmp_path, sig) -> None:
    base, fts = checkpoints
    store = Store(tmp_path / "store")
    duration = timed("extract", base, fts[0], "--store", tmp_path / "warm", "-q")
    codes = []
    for i, code in kill_rounds(
        sig, duration, [sig],
        lambda i: ["extract", base, fts[i % len(fts)], "--name", f"v/{i}", "--store", store.root,
                   "-q"],
        lambda i: store,
    ):  # fmt: skip
        codes.append(code)
        if code == 0:
            assert f"v/{i}" in store.refs()
    assert -sig in codes  # the loop did interrupt something
    assert_swept(store)
    assert run_cli("extract", base, fts[0], "--name", "again", "--store", store.root) == 0
    assert_consistent(store)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_killed_merges(checkpoints, tmp_path, sig) -> None:
    base, fts = checkpoints
    store = extract_all(base, fts, Store(tmp_path / "store"), "t{}")
    outdir = tmp_path / "out"
    outdir.mkdir()
    reference = outdir / "reference.safetensors"
    terms = ["t0:0.3", "t1:0.3", "t2:0.3"]
    duration = timed("merge", "--base", base, "-o", reference, *terms, "--store", store.root)
    expected = reference.read_bytes()

    def out(i: int) -> Path:
        return outdir / f"m{i}.safetensors"

    for i, _ in kill_rounds(
        10 + sig, duration, [sig],
        lambda i: ["merge", "--base", base, "-o", out(i), *terms, "--store", store.root, "-q"],
        lambda i: store,
    ):  # fmt: skip
        assert not out(i).exists() or out(i).read_bytes() == expected  # whole or absent
    report = stale_parts([outdir], 0)
    assert all(is_part_file(Path(p)) for p in report.removed)
    assert not any(is_part_file(p) for p in outdir.iterdir())
    assert_swept(store)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_killed_imports(checkpoints, tmp_path, sig) -> None:
    base, fts = checkpoints
    src = extract_all(base, fts, Store(tmp_path / "src"), "ns/t{}")
    bundle = tmp_path / "b.tar"
    assert run_cli("store", "export", "ns/", "-o", bundle, "--store", src.root) == 0
    wanted = src.refs()
    duration = timed("store", "import", bundle, "--store", tmp_path / "warm")
    def dst(i: int) -> Store:
        return Store(tmp_path / f"dst{i}")

    for i, code in kill_rounds(
        20 + sig, duration, [sig], lambda i: ["store", "import", bundle, "--store", dst(i).root],
        dst,
    ):
        store = dst(i)
        if code == 0:
            assert store.refs() == wanted
        assert set(store.refs().items()) <= set(wanted.items())
        assert_swept(store)
        assert run_cli("store", "import", bundle, "--store", store.root) == 0
        assert store.refs() == wanted
        assert_consistent(store)


@pytest.mark.slow
def test_killed_composes(assets, isolated_store) -> None:
    """SIGKILL and SIGTERM in turn (compose's runs are the slowest, so one loop for both)."""
    from compose_assets import extract, model_args

    store = Store()
    for task in ("colors", "stripes"):
        extract(assets, getattr(assets, f"ft_{task}"), task)
    args = ["compose", "colors", "stripes", *model_args(assets), "--data", assets.colors,
            "--epochs", "2", "--store", store.root, "-q"]
    duration = timed(*args, "--name", "first")
    for i, code in kill_rounds(
        30, duration, [signal.SIGKILL, signal.SIGTERM], lambda i: [*args, "--name", f"c/{i}"],
        lambda i: store,
    ):
        if code == 0:
            assert store.manifest(store.resolve(f"c/{i}")).kind == "coefs"
    assert_swept(store, keep=("compose-runs",))  # resumable runs are compose's to remove
    assert run_cli(*args, "--name", "last", "--resume") == 0
    assert store.resolve("last") == store.resolve("first")  # same inputs, same coefficients
    assert_swept(store, keep=("compose-runs",))


@pytest.mark.slow
def test_gc_racing_extracts_never_deletes_what_a_ref_reaches(checkpoints, tmp_path) -> None:
    base, fts = checkpoints
    store = Store(tmp_path / "store")
    store.init()
    pids = {fork_cli("extract", base, ft, "--name", f"r/{j}", "--store", store.root): j
            for j, ft in enumerate(fts * 2)}
    results: dict[int, int] = {}
    while len(results) < len(pids):
        gc(store, 0)
        for pid in pids:
            if pid not in results:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    results[pid] = os.waitstatus_to_exitcode(status)
    assert set(results.values()) <= {0, 1}  # 1: tagging an object gc had just swept
    for pid, code in results.items():
        if code == 0:
            assert f"r/{pids[pid]}" in store.refs()
    gc(store, 0)
    assert_consistent(store)
    assert_swept(store)


def test_clean_removes_only_stale_tvtool_part_files(invoke, tmp_path) -> None:
    d = tmp_path / "outs"
    (d / "sub").mkdir(parents=True)
    ours = [d / ".m.safetensors.0123abcd.part", d / "sub" / ".b.tar.deadbeef.part"]
    others = [d / "m.part", d / ".m.part", d / ".m.0123ABCD.part", d / ".m.0123abc.part",
              d / "m.safetensors", d / ".m.0123abcd.part.keep"]
    for p in ours + others:
        p.write_bytes(b"x" * 10)
    old = time.time() - 7200
    for p in ours + others:
        os.utime(p, (old, old))
    (d / ".link.0123abcd.part").symlink_to(d / "m.safetensors")
    fresh = d / ".new.safetensors.aaaaaaaa.part"
    fresh.write_bytes(b"y")
    r = invoke("clean", d, "--dry-run", "--json")
    assert r.exit_code == 0 and all(p.exists() for p in ours)
    assert __import__("json").loads(r.stdout)["removed"] == [str(ours[0])]
    r = invoke("clean", d, "-r")
    assert r.exit_code == 0 and "removed 2 part file(s)" in r.stderr
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in others) and fresh.exists()
    assert (d / ".link.0123abcd.part").is_symlink()
    assert invoke("clean", d, "--grace", "0").exit_code == 0 and not fresh.exists()
    r = invoke("clean", tmp_path / "nope")
    assert r.exit_code in (1, 2) and "Traceback" not in r.stderr
