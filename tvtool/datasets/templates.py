"""Prompt templates (one placeholder, filled without str.format) and the text files of names.

A template is text with one ``{}`` (or ``{c}``) where the class name goes, e.g.
``"a photo of a {}."``. Templates are never passed to ``str.format``: a template such as
``"{}{0.__class__}"`` would read attributes, and ``"{} {"`` would raise. Any other brace is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tvtool.errors import TvtoolError

_PLACEHOLDER = re.compile(r"\{c?\}")


def check_template(t: str, where: str = "template") -> str:
    """`t` itself when it holds exactly one ``{}``/``{c}`` and no other brace; else an error."""
    holes = _PLACEHOLDER.findall(t)
    rest = _PLACEHOLDER.sub("", t)
    if len(holes) != 1 or "{" in rest or "}" in rest:
        raise TvtoolError(
            f"{where} {t!r}: a template needs exactly one '{{}}' (or '{{c}}') for the class "
            "name and no other braces"
        )
    return t


def check_templates(templates: Sequence[str], where: str = "template") -> list[str]:
    if not templates:
        raise TvtoolError(f"{where}: no templates")
    return [check_template(t, where) for t in templates]


def fill(t: str, classname: str) -> str:
    """The prompt for one class: the placeholder replaced by `classname` (no formatting)."""
    check_template(t)
    return _PLACEHOLDER.sub(lambda _: classname, t, count=1)


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (class names, templates)."""
    path = Path(path).expanduser()
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise TvtoolError(f"cannot read {what} file {path}: {e}") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise TvtoolError(f"{what} file {path} is empty")
    return lines
