"""What a built CLIP is (`LoadedClip`, for open_clip and HF models alike) and the device it runs
on; below `build` and `hf_clip`, which both make one (so neither imports the other back)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.errors import TvtoolError


@dataclass
class LoadedClip:
    """An open_clip model in eval mode with what is needed to feed and identify it."""

    model: torch.nn.Module
    name: str
    base_fingerprint: str
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    tokenizer: Any
    device: torch.device
    source: str = ""
    tower_prefix: str = "visual."  # image-tower parameter names: prefix + the tower's own names
    family: str = "open_clip"  # or "hf-clip" (tvtool.models.hf_clip)
    activation: str = "gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu"
    activation_source: str = "default"  # option | architecture | checkpoint | default
    has_text: bool = True  # False: an image-tower-only base (heads from files or a text tower)
    text_fingerprint: str = ""  # sha256 of the --text-tower weights ("" : the base's own)

    @property
    def logit_scale(self) -> float:
        """exp(learned logit scale), clamped at 100 as CLIP does: logits = scale * f @ head.T."""
        ls = getattr(self.model, "logit_scale", None)
        if ls is None:
            return 100.0
        return float(ls.detach().float().exp().clamp(max=100.0).item())

    def visual_keys(self) -> list[str]:
        """State-dict names of the image tower's parameters (``visual.*`` for open_clip)."""
        return [self.tower_prefix + n for n, _ in self.model.visual.named_parameters()]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` -> cuda when present, else cpu; `cpu`, `cuda`, `cuda:N` checked for availability."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            idx = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
            return torch.device("cuda", idx)
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise TvtoolError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TvtoolError(
                f"device {spec!r} requested but CUDA is not available (use --device cpu)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TvtoolError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise TvtoolError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return dev
