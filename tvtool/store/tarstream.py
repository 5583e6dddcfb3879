"""A strict, streaming reader of the tar files tvtool writes (plain, or gzip/bz2/xz-compressed).

Why not `tarfile`: it reads pax and GNU long-name headers whole into memory (a 2 MB gzip file
can declare a 2 GB header), and it follows the last of two members of the same name. This
reader holds one 512-byte block at a time, caps every header, accepts only regular files (and
the pax/long-name headers that describe them), and hands out member data as a bounded stream.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tvtool.errors import TvtoolError

BLOCK = 512
MAX_EXTENDED = 1 << 20  # a pax header or GNU long name larger than this is refused
_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


class TarFormatError(TvtoolError):
    """Not a well-formed tar file (or one with members tvtool never writes)."""


def open_stream(path: Path) -> IO[bytes]:
    """The file, decompressed on the fly when it starts with a gzip, bz2 or xz signature."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return opener(path, "rb")  # type: ignore[operator]
    return open(path, "rb")  # noqa: SIM115


@dataclass
class Member:
    name: str
    size: int


class TarStream:
    """Iterate `members()`; while on a member, `read(n)` returns its data (never more than
    its size). Unread data is skipped when the next member is requested."""

    def __init__(self, f: IO[bytes], where: str):
        self._f, self._where = f, where
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0

    def _raw(self, n: int) -> bytes:
        try:
            return self._f.read(n)
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:  # damaged
            raise TarFormatError(f"{self._where} is damaged ({e})") from None

    def _exact(self, n: int) -> bytes:
        data = self._raw(n)
        if len(data) != n:
            raise TarFormatError(f"{self._where} is truncated")
        return data

    def read(self, n: int) -> bytes:
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._exact(n)
        self._left -= n
        return data

    def _skip(self) -> None:
        while self._left:
            self.read(1 << 20)
        if self._pad:
            self._exact(self._pad)
            self._pad = 0

    def members(self) -> Iterator[Member]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            self._skip()
            block = self._raw(BLOCK)
            if not block or block == bytes(BLOCK):
                if long_name is not None or pax:
                    raise TarFormatError(f"{self._where} ends inside a member's header")
                return
            if len(block) != BLOCK:
                raise TarFormatError(f"{self._where} is truncated")
            name, size, kind = self._header(block)
            self._left, self._pad = size, -size % BLOCK
            if kind in (b"x", b"g", b"L"):
                if size > MAX_EXTENDED:
                    raise TarFormatError(
                        f"{self._where}: a tar header of {size} bytes (at most {MAX_EXTENDED})"
                    )
                data = self.read(size)
                if kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "replace")
                elif kind == b"x":
                    pax = _pax_records(data, self._where)
                continue
            if kind not in (b"0", b"\0", b"7"):
                raise TarFormatError(
                    f"{self._where}: member {name!r} is not a regular file (type {kind!r})"
                )
            name = pax.get("path", long_name or name)
            if "size" in pax:
                size = _int(pax["size"], self._where)
                self._left, self._pad = size, -size % BLOCK
            long_name, pax = None, {}
            yield Member(name, size)

    def _header(self, block: bytes) -> tuple[str, int, bytes]:
        stored = _octal(block[148:156], self._where)
        actual = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if stored != actual:
            raise TarFormatError(f"{self._where} is not a tar file (bad header checksum)")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\x00" and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        raw = block[124:136]
        size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else _octal(raw, self._where)
        return name.decode("utf-8", "replace"), size, block[156:157]


def _octal(field: bytes, where: str) -> int:
    text = field.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{where} is not a tar file (bad number in a header)") from None


def _int(text: str, where: str) -> int:
    if not text.isdigit():
        raise TarFormatError(f"{where}: bad size {text[:20]!r} in a pax header")
    return int(text)


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """`LEN key=value\\n` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"{where}: malformed pax header") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise TarFormatError(f"{where}: malformed pax header")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out
