"""Every case of the hostile corpus (tests/hostile_corpus.py) given to `tvtool extract` in its own
process: exit 1, one `Error:` line and no traceback, no pickle code ran, nothing stored or left
in the store's tmp/, and for the bomb cases a peak RSS within 1.5 GB of a valid extract's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hostile_corpus import BOMBS, CASES  # noqa: E402

RSS_BOUND = 1_500_000_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent),
           "TVTOOL_HOME": str(root / "home"), "COLUMNS": "400"}
    env.pop("TVTOOL_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "hostile_corpus.py"), str(root / "corpus")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _store_is_empty(store: Path) -> list[str]:
    """Files the failed extract left in its store (objects, refs, temp files)."""
    if not store.exists():
        return []
    return [str(p.relative_to(store)) for p in store.rglob("*")
            if p.is_file() and p.name != "store.json" and not p.name.endswith(".lock")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_fails_cleanly(outcome: dict, name: str) -> None:
    result = outcome["results"][name]
    assert not result["canary"], "pickled code ran"
    for run in result["runs"]:
        lines = [line for line in run["stderr"].splitlines() if line.strip()]
        assert run["code"] == 1, run["stderr"][-2000:]
        assert len(lines) == 1 and lines[0].startswith("Error: "), run["stderr"][-2000:]
        assert "Traceback" not in run["stderr"]
        assert "\x1b" not in run["stderr"] and "\x07" not in run["stderr"]
    assert _store_is_empty(Path(result["dir"]) / "store") == []
    if name in BOMBS:
        for run in result["runs"]:
            assert run["rss"] - outcome["control_rss"] < RSS_BOUND, run


def test_messages_name_the_problem(outcome: dict) -> None:
    """A few messages checked word for word: the fix a user needs is in the line."""
    def line(name: str) -> str:
        return outcome["results"][name]["runs"][0]["stderr"].strip()

    assert "header of" in line("st_header_40mb_600k")
    assert "outside the index's directory" in line("idx_traversal")
    assert "stride-0 or overlapping" in line("pt_stride0")
    assert "compressed archive expands" in line("pt_zip_bomb")
    assert "\\x1b[2J" in line("st_name_escape_clear")  # shown escaped, never interpreted
    assert "[red]a.weight[/red]" in line("st_name_rich_markup")  # markup shown literally
    assert "refusing to load pickled global" in line("pt_evil_builtins_exec_zip")
    assert "key 1 is not a string (int)" in line("pt_int_keys")
