"""Errors that map to exit codes and one-line messages (no traceback unless TVTOOL_DEBUG=1)."""

from __future__ import annotations


class TvtoolError(Exception):
    """A user error: bad input, with an actionable one-line message (exit 1)."""

    exit_code = 1


class IntegrityError(TvtoolError):
    """The store holds corrupt data (exit 3)."""

    exit_code = 3


class UnsafePickleError(TvtoolError):
    """A pickle asked for something the restricted unpickler refuses."""


def few(items: list[str], n: int = 4, more: int = 0) -> str:
    """The first `n` items for a one-line message: ``a, b, c and 5 more`` (`more` uncounted)."""
    rest = len(items) - n + more
    return ", ".join(items[:n]) + (f" and {rest} more" if rest > 0 else "")


def printable(text: str) -> str:
    """`text` safe to show on a terminal: control characters (ESC, BEL, CR, ...), lone
    surrogates and other unprintable code points become `\\x1b`-style escapes."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(repr(c)[1:-1] if c not in "'\"" else c)
    return "".join(out)
