"""Shell completion: committed scripts are current, and stored names complete."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tvtool.cli import completions
from tvtool.store import Store


@pytest.fixture
def named() -> dict[str, str]:
    store = Store()
    cars = store.put_json({"v": "cars"}, "vector").digest
    dtd = store.put_json({"v": "dtd"}, "vector").digest
    store.set_ref("vit-b-32/cars", cars)
    store.set_ref("vit-b-32/dtd", dtd)
    store.set_ref("cars-ft", cars)
    return {"cars": cars, "dtd": dtd}


def _complete(shell: str, line: str) -> str:
    """Ask the app for completions the way the generated script does, in-process."""
    from tvtool.cli.app import app

    if shell == "bash":
        words = line.split(" ")
        env = {"COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    else:
        env = {"_TYPER_COMPLETE_ARGS": line, "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    env[completions.COMPLETE_VAR] = f"complete_{shell}"
    r = CliRunner().invoke(app, [], env=env, prog_name="tvtool")
    assert r.exit_code == 0, r.output
    return r.stdout


def test_committed_scripts_are_current() -> None:
    stale = completions.stale()
    assert stale == [], f"stale completion scripts {stale}: run `python -m tvtool.cli.completions`"


def test_check_and_write(tmp_path: Path, capsys) -> None:
    assert completions.main(["--check", "--dir", str(tmp_path)]) == 1
    assert completions.main(["--dir", str(tmp_path)]) == 0
    assert completions.main(["--check", "--dir", str(tmp_path)]) == 0
    bash = tmp_path / "tvtool.bash"
    bash.write_text(bash.read_text().replace("tvtool", "tvtol"))
    assert completions.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "tvtool.bash" in capsys.readouterr().err


def test_scripts_hook_the_app() -> None:
    assert completions.completion_var() == completions.COMPLETE_VAR == "_TVTOOL_COMPLETE"
    for shell in completions.SHELLS:
        text = completions.render(shell)
        assert "_TVTOOL_COMPLETE=complete_" + shell in text
    assert completions.render("zsh").startswith("#compdef tvtool\n")
    assert "complete -o default -F _tvtool_completion tvtool" in completions.render("bash")


def test_bash_completes_store_names(named) -> None:
    assert _complete("bash", "tvtool store show ").split() == [
        "cars-ft", "vit-b-32/cars", "vit-b-32/dtd"]
    assert _complete("bash", "tvtool store show vit-b-32/c").split() == ["vit-b-32/cars"]
    assert _complete("bash", "tvtool store rm vit").split() == ["vit-b-32/cars", "vit-b-32/dtd"]
    assert _complete("bash", "tvtool store tag cars").split() == ["cars-ft"]
    assert _complete("bash", "tvtool store export cars-ft vit-b-32/d").split() == [
        "vit-b-32/dtd"]
    # digest prefixes complete (to 12 characters) once they are typed
    assert _complete("bash", f"tvtool store tag {named['dtd'][:3]}").split() == [
        named["dtd"][:12]]
    assert "store" in _complete("bash", "tvtool st").split()


def test_completion_reads_the_store_given_by_option(named, tmp_path: Path) -> None:
    other = Store(tmp_path / "other")
    other.set_ref("elsewhere", other.put_json({"v": 1}, "vector").digest)
    line = f"tvtool store show --store {other.root} "
    assert _complete("bash", line).split() == ["elsewhere"]


def test_zsh_and_fish_formats(named) -> None:
    assert _complete("zsh", "tvtool store rm vit-b-32/d") == (
        "_arguments '*: :((\"vit-b-32/dtd\"))'\n")
    assert _complete("fish", "tvtool store show vit-b-32/").split() == [
        "vit-b-32/cars", "vit-b-32/dtd"]


def test_real_bash_with_the_committed_script(named) -> None:
    bash = shutil.which("bash")
    tvtool = Path(sys.executable).parent / "tvtool"
    if bash is None or not tvtool.exists():
        pytest.skip("needs bash and the installed tvtool entry point")
    script = completions.script_path("bash")
    cmd = (
        f"source {script}; COMP_WORDS=(tvtool store show vit-b-32/); COMP_CWORD=3; "
        '_tvtool_completion tvtool; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = {**os.environ, "PATH": f"{tvtool.parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([bash, "--norc", "--noprofile", "-c", cmd], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["vit-b-32/cars", "vit-b-32/dtd"]
