"""The README stays true: its opening commands, CI's command, and every command/option it shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from tvtool.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln]


def test_readme_opens_with_exactly_two_commands():
    head = README.split("\n## ", 1)[0]
    first = _code_blocks(head)[0]
    assert _commands(first) == ["make demo", "make test"]
    assert README.index("make demo") < 200  # in the first lines


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_changelog_has_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert "### Added" in text


def _ctx(cmd):
    import typer

    return typer.Context(cmd)


def _tvtool_invocations() -> list[list[str]]:
    """Every `tvtool ...` command line in the README's code blocks (continuations joined)."""
    out = []
    for block in _code_blocks(README):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\$\(|\||;|&&", line):
                part = part.strip().rstrip(")")
                if part.startswith("tvtool "):
                    out.append(shlex.split(part.split(" #", 1)[0])[1:])
    return out


def _is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands")


def _resolve(args: list[str]):
    cmd = typer.main.get_command(app)
    rest = list(args)
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(_ctx(cmd), rest[0])
        assert sub is not None, f"README shows unknown command: tvtool {' '.join(args)}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def test_every_readme_command_and_option_exists():
    calls = _tvtool_invocations()
    assert len(calls) >= 10
    for args in calls:
        cmd, rest = _resolve(args)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for tok in rest:
            if tok.startswith("--"):
                opt = tok.split("=", 1)[0]
                assert opt in known, f"README: `tvtool {' '.join(args)}` uses unknown {opt}"


def test_every_command_is_documented():
    root = typer.main.get_command(app)
    assert _is_group(root)
    for name in root.list_commands(_ctx(root)):
        assert f"tvtool {name}" in README, f"README never mentions `tvtool {name}`"


def test_reproducing_defaults_table_matches_the_recipes():
    """The README's defaults per objective are the ones compose uses (tvtool/compose/recipes)."""
    from tvtool.compose.recipes import RECIPES

    sec = README.split("## Reproducing the papers on the public banks", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in ln.strip("|").split("|")]
        for ln in sec.splitlines()
        if ln.startswith("| ") and not ln.startswith("| run ")
    ]
    first = {"few-shot": "few-shot", "addition": "addition", "negation": "negation",
             "test-time-pseudo": "test-time, `ufm`", "test-time-entropy": "test-time, `entropy`"}
    assert len(rows) == len(RECIPES)
    for name, r in RECIPES.items():
        (row,) = [row for row in rows if row[0].startswith(first[name])]
        opt, batch, clip, source = row[1], row[2], row[3], row[5]
        assert float(re.search(r"\d+e-\d+", opt).group()) == pytest.approx(r.lr), name
        wd = 0.0 if "decay 0" in opt else float(opt.rsplit(",", 1)[1])
        assert wd == r.weight_decay, name
        epochs, schedule = re.search(r"(\d+)(?: \([^)]*\))?, (cosine|constant)", batch).groups()
        assert (int(epochs), schedule) == (r.epochs, r.schedule), name
        assert clip == (f"{r.clip_grad:.1f}" if r.clip_grad else "none"), name
        assert r.source.split()[0].split("/")[1] in source, name
