"""Hugging Face CLIP (`CLIPModel`, `CLIPVisionModel`) folders as tvtool models.

Design: tvtool runs transformers' own modules, not a port onto open_clip. The image tower is the
HF `vision_model` followed by the `visual_projection` (when the base has one), and its parameters
are named exactly as in a `CLIPModel` state dict (``vision_model.encoder.layers.0.self_attn.q_proj
.weight``, ``visual_projection.weight``). Hence

* a coefficient is one per HF tensor (q, k and v projections are separate blocks), the
  granularity FusionBench's layer-wise AdaMerging learns;
* `torch.func.functional_call` replaces tower tensors exactly as for open_clip (`tower_prefix`
  is empty: parameter names are the checkpoint's);
* vectors and merged checkpoints stay in the bank's own (HF) key layout.

Layouts read: transformers 4.x (`CLIPVisionModel` keys under ``vision_model.``, persistent
``position_ids`` buffers) and 5.x (`CLIPVisionModel` keys without the prefix, no buffers), a single
file or shards, fp32/fp16/bf16 (weights are loaded into an fp32 model). The architecture comes
from the folder's ``config.json``; preprocessing from ``preprocessor_config.json`` when present
(else CLIP's defaults); text from the folder's tokenizer files, else open_clip's CLIP BPE (the
same vocabulary, 49408 tokens). Image features are ``visual_projection(pooler_output)``, the
``CLIPModel.get_image_features`` of transformers; text features ``get_text_features``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tvtool.errors import TvtoolError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_MODEL_TYPES = ("clip", "clip_vision_model")
TOWER = "vision_model."
PROJECTION = "visual_projection.weight"


def hf_config_path(path: Path | str | None) -> Path | None:
    """The ``config.json`` of an HF CLIP folder (or the file itself); None if `path` is not one."""
    if path is None:
        return None
    p = Path(path).expanduser()
    cfg = p / "config.json" if p.is_dir() else p
    if cfg.name != "config.json" or not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(doc, dict) and doc.get("model_type") in _MODEL_TYPES else None


def is_hf_clip(path: Path | str | None) -> bool:
    return hf_config_path(path) is not None


class HFImageTower(torch.nn.Module):
    """pixel values [N, 3, H, W] -> image features [N, D] (projected when a projection exists)."""

    def __init__(self, vision_model: torch.nn.Module, projection: torch.nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=images).pooler_output
        return pooled if self.visual_projection is None else self.visual_projection(pooled)


class HFClip(torch.nn.Module):
    """The parts of a `CLIPModel` tvtool uses, keyed like its state dict.

    ``visual`` is the image tower (a view over the same modules, not registered twice);
    ``encode_text(tokens)`` is ``get_text_features``; ``logit_scale`` as in CLIP."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        vision = getattr(hf, "vision_model", hf)
        if type(hf).__name__ == "CLIPVisionModel" and hasattr(vision, "vision_model"):
            vision = vision.vision_model  # 4.x: CLIPVisionModel wraps a CLIPVisionTransformer
        self.vision_model = vision
        self.visual_projection = getattr(hf, "visual_projection", None)
        self.text_model = getattr(hf, "text_model", None)
        self.text_projection = getattr(hf, "text_projection", None)
        if isinstance(getattr(hf, "logit_scale", None), torch.nn.Parameter):
            self.logit_scale = hf.logit_scale
        self.__dict__["visual"] = HFImageTower(self.vision_model, self.visual_projection)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_model is None or self.text_projection is None:
            raise TvtoolError(
                "this HF base is a CLIPVisionModel (no text tower): zero-shot heads need a "
                "CLIPModel base, or give the head with --head"
            )
        return self.text_projection(self.text_model(input_ids=tokens).pooler_output)


class HFTokenizer:
    """Prompts -> input ids [N, context] padded to the text tower's context length."""

    def __init__(self, folder: Path, context: int, vocab: int):
        self.folder, self.context, self.vocab = folder, context, vocab
        self._impl: Any = None

    def _load(self) -> Any:
        files = ("tokenizer.json", "vocab.json")
        if any((self.folder / f).is_file() for f in files):
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as e:
                raise TvtoolError(f"{self.folder}: cannot read the tokenizer ({e})") from None
            return lambda texts: tok(
                list(texts), padding="max_length", truncation=True, max_length=self.context,
                return_tensors="pt",
            ).input_ids
        if self.vocab != 49408:
            raise TvtoolError(
                f"{self.folder} has no tokenizer files and a {self.vocab}-token vocabulary (not "
                "CLIP's BPE): add the tokenizer files or give the head with --head"
            )
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=self.context)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._impl is None:
            self._impl = self._load()
        return self._impl(texts)


def _preprocess(folder: Path, image_size: int) -> dict[str, Any]:
    """Image size, mean, std and interpolation from preprocessor_config.json (or CLIP's)."""
    out: dict[str, Any] = {
        "size": image_size, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"
    }
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return out
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TvtoolError(f"{path}: not readable JSON ({e})") from None
    crop = doc.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge", image_size))
    out["size"] = int(crop)
    out["mean"] = tuple(doc.get("image_mean", CLIP_MEAN))
    out["std"] = tuple(doc.get("image_std", CLIP_STD))
    out["interpolation"] = _RESAMPLE.get(doc.get("resample", 3), "bicubic")
    return out


def build_hf_module(config_path: Path) -> torch.nn.Module:
    """A randomly initialised `CLIPModel`/`CLIPVisionModel` from a config.json."""
    import transformers

    doc = json.loads(config_path.read_text())
    cls_cfg, cls_model = (
        (transformers.CLIPConfig, transformers.CLIPModel)
        if doc["model_type"] == "clip"
        else (transformers.CLIPVisionConfig, transformers.CLIPVisionModel)
    )
    try:
        config = cls_cfg.from_pretrained(str(config_path.parent), local_files_only=True)
        return cls_model(config).float()  # computed in fp32 whatever the stored dtype
    except Exception as e:
        raise TvtoolError(f"{config_path}: cannot build the HF CLIP model ({e})") from None


def load_weights(net: torch.nn.Module, path: Path) -> str:
    """Copy an HF checkpoint (either layout) into `net` (an HFClip); returns its fingerprint.

    Every model tensor must be present; ``position_ids`` buffers are ignored; keys of a
    bare 5.x `CLIPVisionModel` are read under ``vision_model.``."""
    from tvtool.checkpoints.keymaps import hf_model_key
    from tvtool.checkpoints.readers import open_checkpoint

    state = net.state_dict()
    with open_checkpoint(path) as reader:
        mapping: dict[str, str] = {}
        unexpected = []
        for k in reader.keys():
            target = hf_model_key(k, state)
            if target is None:
                if not k.endswith("position_ids"):
                    unexpected.append(k)
                continue
            mapping[target] = k
        missing = sorted(set(state) - set(mapping))
        if missing or unexpected:
            parts = [f"missing {len(missing)} key(s): {', '.join(missing[:4])}"] if missing else []
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:4])}")
            raise TvtoolError(f"{path} does not fit its config.json ({'; '.join(parts)})")
        with torch.no_grad():
            for target, k in mapping.items():
                if tuple(reader.meta(k).shape) != tuple(state[target].shape):
                    raise TvtoolError(
                        f"{path}: {k} has shape {list(reader.meta(k).shape)}, config.json says "
                        f"{list(state[target].shape)}"
                    )
                state[target].copy_(reader.get(k).to(state[target].dtype))
        return reader.fingerprint()


def load_hf_clip(base: Path, config: Path | None = None, device: Any = "cpu"):
    """A LoadedClip over an HF CLIP folder (or weights `base` + an HF `config` json)."""
    from tvtool.models.loaded import LoadedClip, resolve_device

    base = Path(base).expanduser()
    cfg_path = hf_config_path(config if config is not None else base)
    if cfg_path is None:
        raise TvtoolError(f"{config or base}: not an HF CLIP folder (config.json, model_type clip)")
    if not base.exists():
        raise TvtoolError(f"checkpoint not found: {base}")
    dev = resolve_device(device)
    net = HFClip(build_hf_module(cfg_path))
    fingerprint = load_weights(net, base)
    net = net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    vcfg = net.vision_model.config
    text = net.text_model.config if net.text_model is not None else None
    folder = cfg_path.parent
    pp = _preprocess(folder, int(vcfg.image_size))
    tokenizer = HFTokenizer(
        folder,
        int(text.max_position_embeddings) if text else 77,
        int(text.vocab_size) if text else 0,
    )
    return LoadedClip(
        model=net,
        name=f"hf-clip/{folder.resolve().name}",
        base_fingerprint=fingerprint,
        image_size=(pp["size"], pp["size"]),
        mean=pp["mean"],
        std=pp["std"],
        interpolation=pp["interpolation"],
        tokenizer=tokenizer,
        device=dev,
        source=str(base),
        tower_prefix="",
        family="hf-clip",
    )
