"""Which tensors a command touches: --include/--exclude regexes and named presets. Torch-free."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tvtool.errors import TvtoolError

PRESETS: dict[str, str] = {
    # the image tower: open_clip (visual.*) or HF CLIP (vision_model.*, visual_projection)
    "visual": r"^(visual|vision_model|visual_projection)\.",
    # attention projections only (q, k, v, out), fused or separate, in either tower
    "attn": r"(^|\.)(attn|attention|self_attn)\."
    r"(in_proj_weight|in_proj_bias|(q|k|v|out|o)_proj\.(weight|bias))$",
}


def _compile(patterns: list[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise TvtoolError(f"invalid {what} regex {p!r}: {e}") from None
    return out


@dataclass
class TensorFilter:
    """Kept: matches any include (if given), every preset, and no exclude."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise TvtoolError(f"unknown preset {unknown[0]!r}: choose from {', '.join(PRESETS)}")
        self._inc = _compile(self.include, "--include")
        self._exc = _compile(self.exclude, "--exclude")
        self._pre = [re.compile(PRESETS[p]) for p in self.presets]

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude or self.presets)

    def __call__(self, key: str) -> bool:
        if self._inc and not any(r.search(key) for r in self._inc):
            return False
        if not all(r.search(key) for r in self._pre):
            return False
        return not any(r.search(key) for r in self._exc)

    def describe(self) -> dict[str, list[str]]:
        return {"include": self.include, "exclude": self.exclude, "presets": self.presets}
