"""Tensor objects in the store: write one streamed, open one for tensor-by-tensor reads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tvtool.checkpoints.readers import SafetensorsReader
from tvtool.checkpoints.writer import DTYPE_TO_ST, SafetensorsStreamWriter, TensorSpec
from tvtool.errors import TvtoolError
from tvtool.store.manifest import Manifest, ObjectKind, TensorInfo
from tvtool.store.store import Store


def write_tensor_object(
    store: Store,
    kind: ObjectKind,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    **manifest_fields: Any,
) -> Manifest:
    """Stream tensors (produced one at a time, in spec order) into a new store object."""
    with store.writer() as w:
        sw = SafetensorsStreamWriter(w, specs)  # type: ignore[arg-type]
        for spec in specs:
            sw.write(spec.name, produce(spec))
        sw.finish()
        dtypes = sorted({DTYPE_TO_ST[s.dtype] for s in specs})
        fields = {
            "kind": kind,
            "format": "safetensors",
            "tensors": [
                TensorInfo(name=s.name, shape=list(s.shape), dtype=DTYPE_TO_ST[s.dtype])
                for s in specs
            ],
            "numel": sum(math.prod(s.shape) for s in specs),
            "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
            **manifest_fields,
        }
        return w.commit(fields)


def save_tensor_object(
    store: Store, kind: ObjectKind, tensors: dict[str, torch.Tensor], **fields: Any
) -> Manifest:
    """Store a small in-memory dict of tensors (coefficients, masks)."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    return write_tensor_object(store, kind, specs, lambda s: tensors[s.name], **fields)


def open_tensor_object(
    store: Store, name: str, kind: ObjectKind | tuple[str, ...] = "vector"
) -> tuple[Manifest, SafetensorsReader]:
    """Resolve `name` and open its blob for streaming reads (keys are stored names, unchanged)."""
    digest = store.resolve(name, kind=kind)
    manifest = store.manifest(digest)
    return manifest, SafetensorsReader.stored(store.blob_path(digest), digest)


def load_tensor_object(
    store: Store, name: str, kind: ObjectKind | tuple[str, ...]
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    manifest, reader = open_tensor_object(store, name, kind)
    with reader:
        return manifest, {k: reader.get(k) for k in reader.keys()}


def load_coefs(store: Store, ref: str):
    """A `coefs` object, validated: (manifest, the [T, G] float32 tensor, its CoefsLayout)."""
    from tvtool.vectors.blocks import CoefsLayout

    manifest, reader = open_tensor_object(store, ref, "coefs")
    with reader:
        if "coefs" not in reader:
            raise TvtoolError(f"coefs object {ref!r} has no 'coefs' tensor")
        coefs = reader.get("coefs").to(torch.float32)
    try:
        layout = CoefsLayout.model_validate(manifest.params["layout"])
    except (KeyError, ValueError) as e:
        raise TvtoolError(f"coefs {ref!r} has no valid layout ({type(e).__name__})") from None
    if tuple(coefs.shape) != (len(layout.vectors), layout.n_groups):
        raise TvtoolError(
            f"coefs {ref!r}: tensor {tuple(coefs.shape)} does not match its "
            f"layout ({len(layout.vectors)} vectors x {layout.n_groups} groups)"
        )
    return manifest, coefs, layout
