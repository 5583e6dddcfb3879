"""Terms: `VECTOR[:WEIGHT]`, a leading `-` negates (`cars:0.3`, `dtd`, `-mnist:0.5`).

The one grammar of weighted vectors (merge and eval). Torch-free. A ref name never starts with
`-` and never holds `:`, so both are unambiguous; a `sha256:` digest prefix is allowed
(`sha256:ab12cd34:0.5`). Weights and --scale are finite with |w| <= MAX_WEIGHT (a weight of
1e308 overflows any float tensor it multiplies).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tvtool.errors import TvtoolError

MAX_WEIGHT = 1e6
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Term:
    """One parsed term: which vector, its explicit weight (None: take --scale), and its sign."""

    ref: str
    weight: float | None = None
    negate: bool = False

    @property
    def sign(self) -> float:
        return -1.0 if self.negate else 1.0

    def resolved_weight(self, default: float) -> float:
        """The signed multiplier of this term: its own weight if given, else `default`."""
        return self.sign * (self.weight if self.weight is not None else default)

    def __str__(self) -> str:
        s = ("-" if self.negate else "") + self.ref
        return s if self.weight is None else f"{s}:{self.weight:g}"


def parse_term(text: str) -> Term:
    """Parse `[-]VECTOR[:WEIGHT]`; raises TvtoolError with the offending text."""
    raw = text.strip()
    negate = raw.startswith("-")
    body = raw[1:] if negate else raw
    weight = None
    ref = body
    if ":" in body:
        head, tail = body.rsplit(":", 1)
        if _NUMBER.match(tail):
            ref, weight = head, float(tail)
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise TvtoolError(
                    f"term {text!r}: the weight must be a finite number of magnitude at most "
                    f"{MAX_WEIGHT:g}"
                )
        elif head.lower() != "sha256":
            raise TvtoolError(f"term {text!r}: {tail!r} is not a number (write VECTOR[:WEIGHT])")
    if not ref or ref.startswith("-"):
        raise TvtoolError(f"term {text!r}: expected [-]VECTOR[:WEIGHT], e.g. cars:0.3 or -mnist")
    return Term(ref=ref, weight=weight, negate=negate)


def parse_terms(texts: list[str]) -> list[Term]:
    return [parse_term(t) for t in texts]


def check_scale(scale: float) -> float:
    """--scale: finite, |scale| <= MAX_WEIGHT."""
    if not math.isfinite(scale) or abs(scale) > MAX_WEIGHT:
        raise TvtoolError(f"--scale must be a finite number of magnitude at most {MAX_WEIGHT:g}")
    return scale


def default_scale(weighted_sum: bool, n_terms: int) -> float:
    """The --scale rule: for weighted sums (task arithmetic) the weight of terms without one,
    1.0 for one vector and 0.3 for several; the other methods (TIES-style means, slerp, model
    stock) multiply their merged delta by it, default 1.0."""
    return 0.3 if weighted_sum and n_terms > 1 else 1.0


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB`, `1000000` -> bytes (decimal units, binary with `i`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not m:
        raise TvtoolError(f"invalid size {text!r}: use e.g. 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), (m.group(2) or "")
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1].lower()]
    base = 1024 if unit.endswith("i") else 1000
    size = int(number * base**power)
    if size < 1:
        raise TvtoolError(f"invalid size {text!r}: must be at least one byte")
    return size
