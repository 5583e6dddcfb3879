"""What a checkpoint says about its MLP activation (QuickGELU or nn.GELU), read from the reader
alone: below models (which decide what to build, `tvtool.models.activation`) and vectors (merge
carries it into the merged file's metadata)."""

from __future__ import annotations

from typing import Any


def checkpoint_activation(reader: Any) -> str | None:
    """'quick_gelu' / 'gelu' when the checkpoint says (a whole pickled module names its
    activation classes; tvtool-written safetensors may record `tvtool.activation`), else None."""
    classes = getattr(reader, "module_classes", None) or set()
    names = {c.rsplit(".", 1)[-1] for c in classes}
    if "QuickGELU" in names:
        return "quick_gelu"
    if "GELU" in names:
        return "gelu"
    try:
        meta = reader.metadata() or {}
    except Exception:  # noqa: BLE001 - metadata is optional
        meta = {}
    act = meta.get("tvtool.activation")
    return act if act in ("quick_gelu", "gelu") else None
