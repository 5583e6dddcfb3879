"""Which tensors a command touches: --include/--exclude regexes and named presets. Torch-free."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from tvtool.errors import TvtoolError

PRESETS: dict[str, str] = {
    # the image tower: open_clip (visual.*), HF CLIPModel / 4.x CLIPVisionModel (vision_model.*,
    # visual_projection); a bare 5.x CLIPVisionModel is recognised by `bind` (BARE_VISION)
    "visual": r"^(visual|vision_model|visual_projection)\.",
    # attention projections only (q, k, v, out), fused or separate, in either tower
    "attn": r"(^|\.)(attn|attention|self_attn)\."
    r"(in_proj_weight|in_proj_bias|(q|k|v|out|o)_proj\.(weight|bias))$",
}


# transformers 5.x saves a `CLIPVisionModel` without the ``vision_model.`` prefix; its names
# (``encoder.layers.*``, ``embeddings.position_embedding``) are also a bare text tower's, so they
# count as the image tower only in a checkpoint that has a patch embedding.
BARE_VISION = (r"^(embeddings\.(patch_embedding\.|class_embedding$|position_embedding\.|"
               r"position_ids$)|pre_layrnorm\.|post_layernorm\.|encoder\.layers\.)")
BARE_VISION_MARK = "embeddings.patch_embedding.weight"


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

    bare_vision: bool = False  # `bind`: the keys are a bare 5.x CLIPVisionModel's

    def __post_init__(self) -> None:
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise TvtoolError(f"unknown preset {unknown[0]!r}: choose from {', '.join(PRESETS)}")
        self._inc = _compile(self.include, "--include")
        self._exc = _compile(self.exclude, "--exclude")
        self._pre = [re.compile(PRESETS[p] + (f"|{BARE_VISION}" if p == "visual" and
                                               self.bare_vision else "")) for p in self.presets]

    def bind(self, keys: Iterable[str]) -> TensorFilter:
        """This filter for one checkpoint's `keys`: ``visual`` also selects a bare (5.x)
        `CLIPVisionModel`'s names when the checkpoint is one (a patch embedding, no prefix)."""
        keys = set(keys)
        bare = BARE_VISION_MARK in keys and "visual" in self.presets
        return replace(self, bare_vision=bare) if bare != self.bare_vision else self

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
