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


def printable(text: object, keep: str = "") -> str:
    """`str(text)` safe to show on a terminal, in error messages and in every human view (the one
    escape helper): control characters (ESC, OSC, BEL, CR, C0/C1, DEL), lone surrogates and other
    unprintable code points (bidi overrides, line separators) become visible `\\x1b`-style
    escapes; space and the characters in `keep` (the output sink keeps tab and newline) stay."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c == " " or c in keep else repr(c)[1:-1] for c in text
    )
