"""Key layouts of CLIP checkpoints: HF 4.x / 5.x, and open_clip <-> HF CLIP names.

* transformers 4.x saves a `CLIPVisionModel` under ``vision_model.`` (and, before 4.31, persistent
  ``position_ids`` buffers); 5.x saves it without the prefix. A `CLIPModel` is ``vision_model.*``,
  ``visual_projection.weight``, ``text_model.*``, ``text_projection.weight``, ``logit_scale`` in
  both. tvtool's canonical HF tower names are the `CLIPModel` ones.
* `align_submodel`: a `CLIPVisionModel` fine-tune of a `CLIPModel` base (FusionBench's layout)
  is compared with the base's image tower only; its keys are read under the base's names, as
  are a 4.x fine-tune's of a 5.x `CLIPVisionModel` base (and the other way round).
* `open_clip_to_hf` names the HF tensor(s) an open_clip image-tower tensor corresponds to (the
  fused ``in_proj`` is three HF tensors: q, k, v rows in that order), for reports and presets.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING, Any

from tvtool.checkpoints.readers import CheckpointReader, TensorMeta

if TYPE_CHECKING:
    import torch

HF_TOWER = "vision_model."
BARE_TOWER_PREFIXES = ("visual.", HF_TOWER)  # open_clip, HF
_HF_TOP = ("vision_model.", "text_model.", "visual_projection.", "text_projection.")


def is_buffer(key: str) -> bool:
    """Non-weight buffers HF CLIP checkpoints may carry (``*.position_ids``)."""
    return key.endswith("position_ids")


def hf_model_key(key: str, model_keys: Container[str]) -> str | None:
    """The model key a checkpoint key loads into: itself, or under ``vision_model.`` (5.x bare
    `CLIPVisionModel`); None when neither exists."""
    if key in model_keys:
        return key
    if HF_TOWER + key in model_keys:
        return HF_TOWER + key
    return None


def looks_like_hf_clip(keys: list[str]) -> bool:
    return any(k.startswith(HF_TOWER) for k in keys) and all(
        k.startswith(_HF_TOP) or k == "logit_scale" for k in keys
    )


class KeyMappedReader(CheckpointReader):
    """A view of a reader with keys renamed (`names`: new name -> the reader's name)."""

    def __init__(self, inner: CheckpointReader, names: Mapping[str, str]):
        super().__init__(inner.path, inner.files)
        self.inner = inner
        self.format = inner.format
        self._names = dict(names)
        self.skipped_non_tensor = getattr(inner, "skipped_non_tensor", [])

    def meta(self, key: str) -> TensorMeta:
        return self.inner.meta(self._names[key])

    def get(self, key: str) -> Any:
        return self.inner.get(self._names[key])

    def read_into(self, key: str, out: torch.Tensor) -> None:
        self.inner.read_into(self._names[key], out)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def metadata(self) -> dict[str, str]:
        return self.inner.metadata()

    def close(self) -> None:
        self.inner.close()


def align_submodel(
    base: CheckpointReader, ft: CheckpointReader
) -> tuple[CheckpointReader, CheckpointReader, str | None]:
    """(base view, fine-tune view, note): an HF `CLIPVisionModel` fine-tune against a
    `CLIPModel` base is compared on the base's image tower only, its keys read under the base's
    names (``vision_model.*``); ``position_ids`` buffers are left out on both sides. Other pairs
    are returned unchanged (note None)."""
    bkeys, fkeys = base.keys(), ft.keys()
    if not (looks_like_hf_clip(bkeys) and any(k.startswith("text_model.") for k in bkeys)):
        return base, _tower_prefix(base, ft), None
    if any(k.startswith(("text_model.", "text_projection.")) for k in fkeys):
        return base, ft, None  # a whole CLIPModel: compared key for key
    bset = set(bkeys)
    names = {}
    for k in fkeys:
        if is_buffer(k):
            continue
        names[hf_model_key(k, bset) or k] = k
    if not all(k.startswith(HF_TOWER) for k in names):
        return base, ft, None
    tower = {k: k for k in bkeys if k.startswith(HF_TOWER) and not is_buffer(k)}
    note = "vision_model"
    return KeyMappedReader(base, tower), KeyMappedReader(ft, names), note


def _tower_prefix(base: CheckpointReader, ft: CheckpointReader) -> CheckpointReader:
    """Two `CLIPVisionModel`s, one saved by transformers 4.x (``vision_model.``), the other by
    5.x (bare): the fine-tune read under the base's names (its ``position_ids`` buffers
    dropped). Any other fine-tune is returned as it is."""
    bset = set(base.keys())
    fkeys = [k for k in ft.keys() if not is_buffer(k)]
    if not fkeys or bset & set(fkeys):
        return ft
    mapped = align_vector(KeyMappedReader(ft, {k: k for k in fkeys}), bset)
    return mapped if mapped.keys() != fkeys else ft


def align_vector(reader: CheckpointReader, base_keys: Container[str]) -> CheckpointReader:
    """A vector read under a base's names when only the HF tower prefix differs: vectors keyed
    ``vision_model.*`` into a 5.x `CLIPVisionModel` base (bare keys), or bare 5.x vectors into a
    `CLIPModel` / 4.x base. Otherwise the reader itself (its keys are the base's, or are
    reported as missing)."""
    keys = reader.keys()
    if not keys or any(k in base_keys for k in keys):
        return reader
    if all(k.startswith(HF_TOWER) and k[len(HF_TOWER):] in base_keys for k in keys):
        return KeyMappedReader(reader, {k[len(HF_TOWER):]: k for k in keys})
    if all(HF_TOWER + k in base_keys for k in keys):
        return KeyMappedReader(reader, {HF_TOWER + k: k for k in keys})
    return reader


_OC_RULES: list[tuple[str, str]] = [
    (r"^visual\.conv1\.weight$", "vision_model.embeddings.patch_embedding.weight"),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.(weight|bias)$", r"vision_model.pre_layrnorm.\1"),
    (r"^visual\.ln_post\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
    (r"^visual\.proj$", "visual_projection.weight"),
    (
        r"^visual\.transformer\.resblocks\.(\d+)\.ln_(1|2)\.(weight|bias)$",
        r"vision_model.encoder.layers.\1.layer_norm\2.\3",
    ),
    (
        r"^visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)$",
        r"vision_model.encoder.layers.\1.self_attn.out_proj.\2",
    ),
    (
        r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)$",
        r"vision_model.encoder.layers.\1.mlp.fc1.\2",
    ),
    (
        r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)$",
        r"vision_model.encoder.layers.\1.mlp.fc2.\2",
    ),
]
_IN_PROJ = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def open_clip_to_hf(key: str) -> list[str]:
    """The HF CLIP tensor names an open_clip image-tower key corresponds to ([] if none).

    ``in_proj_{weight,bias}`` is split into the q, k, v projections (rows in that order);
    ``proj`` is ``visual_projection.weight`` transposed."""
    m = _IN_PROJ.match(key)
    if m:
        layer, kind = m.groups()
        return [f"vision_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
    for pattern, repl in _OC_RULES:
        if re.match(pattern, key):
            return [re.sub(pattern, repl, key)]
    return []
