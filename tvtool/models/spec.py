"""Which model a run builds and which weights it loads: the part of `ComposeRequest`,
`SelectRequest` and `EvalRequest` that `--model/--model-config`, `--base/--pretrained`,
`--device`, `--quick-gelu` and `--text-tower` fill. Torch-free (the CLI builds it before any
model is loaded); `load()` builds the model (`tvtool.models.build.load_clip`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModelSpec(BaseModel):
    """An open_clip (or HF CLIP) architecture and its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str | None = None  # --model: an open_clip architecture name
    config: Path | None = None  # --model-config: a custom config JSON (name = file stem)
    base: Path | None = None  # --base: pre-trained weights, any checkpoint format
    pretrained: str | None = None  # --pretrained: a locally cached open_clip tag
    device: str = "auto"
    quick_gelu: bool | None = None  # None: from the checkpoint, the name or the tag
    text_tower: str | None = None  # a checkpoint or tag whose text tower replaces the base's

    @property
    def given(self) -> bool:
        """An architecture is named, or the base is an HF CLIP folder (data-free
        `select --score norm` needs no model)."""
        if self.arch is not None or self.config is not None:
            return True
        from tvtool.models.hf_clip import is_hf_clip

        return self.base is not None and is_hf_clip(self.base)

    def load(
        self,
        device: str | None = None,
        base: Path | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> Any:
        """The LoadedClip, on `device` (default: the spec's) with weights `base` (default: the
        spec's), in eval mode."""
        from tvtool.models.build import load_clip

        return load_clip(
            model=self.arch,
            model_config=self.config,
            base=base if base is not None else self.base,
            pretrained=self.pretrained,
            device=device or self.device,
            quick_gelu=self.quick_gelu,
            text_tower=self.text_tower,
            warn=warn,
        )
