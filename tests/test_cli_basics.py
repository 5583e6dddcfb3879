"""CLI basics: help and completion stay torch-free, version, exit codes, error reporting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tvtool import __version__
from tvtool.store import Store

HEAVY = ("torch", "torchvision", "open_clip", "safetensors.torch")

# Runs `--help` for the root, every command and every subcommand in one fresh interpreter,
# then reports which heavy modules got imported.
_ALL_HELP = textwrap.dedent(
    """
    import sys
    import typer
    from tvtool.cli.app import app

    root = typer.main.get_command(app)

    def walk(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, path + [name])

    paths = list(walk(root, []))
    for path in paths:
        try:
            root.main(path + ["--help"], prog_name="tvtool")
        except SystemExit as e:
            assert e.code == 0, (path, e.code)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy_roots})
    print("HELP-PATHS", len(paths), "HEAVY", ",".join(heavy) or "-", file=sys.stderr)
    """
).replace("{heavy_roots}", repr({m.split(".")[0] for m in HEAVY} - {"safetensors"}))


def _run(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
        timeout=120, **kw,
    )


def _imported(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    out = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            out.add(line.rsplit("|", 1)[1].strip())
    return out


def test_help_of_every_command_imports_no_torch() -> None:
    r = _run("-c", _ALL_HELP)
    assert r.returncode == 0, r.stderr
    marker = r.stderr.strip().splitlines()[-1].split()
    assert int(marker[1]) >= 10  # root, store and its subcommands at least
    assert marker[3] == "-", f"--help imported {marker[3]}"
    assert "store" in r.stdout and "export" in r.stdout


def test_entry_point_help_imports_no_torch() -> None:
    r = _run("-X", "importtime", "-m", "tvtool", "store", "--help")
    assert r.returncode == 0 and "verify" in r.stdout
    modules = _imported(r.stderr)
    assert "tvtool.cli.app" in modules
    assert not [m for m in modules if m in HEAVY or m.startswith("torch.")]


def test_completion_imports_no_torch_and_lists_names() -> None:
    store = Store()
    store.set_ref("vit-b-32/cars", store.put_json({"v": 1}, "vector").digest)
    env = {"_TVTOOL_COMPLETE": "complete_bash", "COMP_WORDS": "tvtool store show vit",
           "COMP_CWORD": "3"}
    r = _run("-X", "importtime", "-m", "tvtool", env=env)
    assert r.returncode == 0
    assert r.stdout.split() == ["vit-b-32/cars"]
    modules = _imported(r.stderr)
    assert "tvtool.cli.app" in modules
    assert not [m for m in modules if m in HEAVY or m.startswith("torch.")]


def test_version() -> None:
    r = _run("-m", "tvtool", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tvtool {__version__}"


def test_usage_errors_exit_2(invoke) -> None:
    for args in (["no-such-command"], ["store", "tag", "onlyone"], ["store", "ls", "--bogus"],
                 ["store", "gc", "--grace", "later"], ["store", "ls", "--kind", "vectors"]):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.exit_code)
        assert "Usage:" in r.stderr and r.stdout == ""


def test_user_error_is_one_line_without_traceback() -> None:
    r = _run("-m", "tvtool", "store", "show", "no-such-vector")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no ref or object named")
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_debug_shows_traceback() -> None:
    r = _run("-m", "tvtool", "store", "show", "no-such-vector", env={"TVTOOL_DEBUG": "1"})
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "TvtoolError" in r.stderr


def test_error_markup_is_not_interpreted(invoke) -> None:
    r = invoke("store", "show", "[bold]x[/bold]")
    assert r.exit_code == 1 and "[bold]x[/bold]" in r.stderr
