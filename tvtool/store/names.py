"""Ref names: what may be created, what is read, and what is always a digest. Torch-free.

A name is a path under `refs/` (namespaces with '/'). Creation is strict (`ref_name_problem`):
no name can shadow a digest or a temp file, escape `refs/`, or exceed the file-name limit.
Reading is wider (`is_ref_path`) so refs made by older versions stay listed and protected.
"""

from __future__ import annotations

import re

from tvtool.errors import TvtoolError

MIN_PREFIX = 8
DIGEST_LEN = 64
NAME_MAX = 255  # bytes per path component (ext4, xfs, btrfs, tmpfs, APFS)
REF_MAX = 1024  # bytes for a whole ref name
_DIGEST = re.compile(r"[0-9a-f]{64}")
_COMPONENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REF = re.compile(rf"{_COMPONENT}(/{_COMPONENT})*")  # always fullmatch: `$` accepts a "\n"
_DIGEST_LIKE = re.compile(rf"(sha256:)?[0-9A-Fa-f]{{{MIN_PREFIX},}}")


def is_digest(text: str) -> bool:
    """A full sha256 digest in lower-case hex."""
    return isinstance(text, str) and bool(_DIGEST.fullmatch(text))


def looks_like_digest(name: str) -> bool:
    """Hex of 8+ characters (optionally `sha256:`): a digest or a prefix, never a ref name."""
    return bool(_DIGEST_LIKE.fullmatch(name.strip()))


def is_ref_path(name: str) -> bool:
    """A safe relative path under refs/ (what `refs()` lists and `get_ref` reads): no empty,
    hidden ('.', '..', '.x': temp files) or over-long components, no control characters.

    Wider than what can be created (`ref_name_problem`): refs made by older versions (`k.tmp`,
    digest-like names) stay readable, listed, protected by gc and reported by verify.
    """
    if not isinstance(name, str) or not name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return all(
        p and not p.startswith(".") and len(p.encode("utf-8", "surrogateescape")) <= NAME_MAX
        for p in name.split("/")
    )


def ref_name_problem(name: str) -> str | None:
    """Why `name` cannot be created as a ref, or None if it can."""
    if not isinstance(name, str) or not name:
        return "a ref name cannot be empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control characters are not allowed"
    parts = name.split("/")
    if any(p == "" for p in parts):
        return "empty path components ('//', or a leading or trailing '/') are not allowed"
    if any(p in (".", "..") for p in parts):
        return "'.' and '..' components are not allowed"
    if not _REF.fullmatch(name):
        return ("use letters, digits, '.', '_', '-' (not first in a component) "
                "and '/' for namespaces")
    if any(len(p.encode()) > NAME_MAX for p in parts) or len(name.encode()) > REF_MAX:
        return f"too long (at most {NAME_MAX} bytes per component, {REF_MAX} in all)"
    if any(p.endswith(".tmp") for p in parts):
        return "components ending in '.tmp' are reserved for temporary files"
    if looks_like_digest(name):
        return (f"hex strings of {MIN_PREFIX}+ characters are read as digests "
                "(digests always win over names)")
    return None


def is_valid_ref_name(name: str) -> bool:
    """Whether `name` may be created as a ref."""
    return ref_name_problem(name) is None


def check_ref_name(name: str) -> str:
    problem = ref_name_problem(name)
    if problem is not None:
        raise TvtoolError(f"invalid ref name {_shown(name)}: {problem}")
    return name


def _shown(name: str, limit: int = 80) -> str:
    """A name for a one-line message: repr (escapes control characters), shortened."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def check_namespaces(names) -> None:
    """Refuse a set of ref names in which one is the namespace of another (`a` and `a/b`)."""
    given = set(names)
    for name in sorted(given):
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in given:
                raise TvtoolError(
                    f"refs {'/'.join(parts[:i])!r} and {name!r} conflict"
                    " (a name cannot be both a ref and a namespace)"
                )
