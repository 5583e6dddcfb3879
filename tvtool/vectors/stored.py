"""Tensor objects in the store: write one streamed, open one for tensor-by-tensor reads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tvtool.checkpoints.readers import CheckpointReader, SafetensorsReader, TensorMeta
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
) -> tuple[Manifest, CheckpointReader]:
    """Resolve `name` and open its blob for streaming reads (keys are stored names, unchanged;
    a factored vector's reader expands its factors: see `FactoredReader`)."""
    digest = store.resolve(name, kind=kind)
    manifest = store.manifest(digest)
    reader = SafetensorsReader.stored(store.blob_path(digest), digest)
    factors = factored_tensors(manifest)
    return manifest, (FactoredReader(reader, factors) if factors else reader)


# A factored (low-rank) vector stores, for a tensor K, ``K::lora_A`` [r, in] and ``K::lora_B``
# [out, r]; its manifest's ``params.factored.tensors[K]`` holds the dense shape, the scale s and
# whether the product is transposed: ``tau[K] = s * B @ A`` (or its transpose). Other tensors of
# the object are dense, under their own names. The blob stays plain safetensors, so `verify`,
# bundles and gc treat it like any other object.
FACTOR_A, FACTOR_B = "::lora_A", "::lora_B"


def factored_tensors(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """{key: {"shape", "scale", "transpose"}} of a factored vector ({} for a dense one)."""
    doc = manifest.params.get("factored") if manifest.kind == "vector" else None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    return tensors if isinstance(tensors, dict) else {}


def vector_tensors(manifest: Manifest) -> list[TensorInfo]:
    """The tensors a vector stands for (a factored pair counts as its dense product)."""
    factors = factored_tensors(manifest)
    if not factors:
        return list(manifest.tensors)
    out = [t for t in manifest.tensors if "::" not in t.name]
    out += [TensorInfo(name=k, shape=list(f["shape"]), dtype="F32") for k, f in factors.items()]
    return sorted(out, key=lambda t: t.name)


class FactoredReader(CheckpointReader):
    """The dense view of a factored vector: ``get(K)`` expands ``s * B @ A`` (fp32) for one
    tensor at a time; dense tensors read as stored. `factor(K)` gives the factors themselves."""

    format = "safetensors"
    factored = True

    def __init__(self, inner: SafetensorsReader, factors: dict[str, dict[str, Any]]):
        super().__init__(inner.path, inner.files)
        self.inner, self.factors = inner, factors
        self._fingerprint = inner._fingerprint
        dense = [k for k in inner.keys() if "::" not in k]
        self._names = {k: k for k in sorted([*dense, *factors])}

    def meta(self, key: str) -> TensorMeta:
        f = self.factors.get(key)
        if f is None:
            return self.inner.meta(key)
        return TensorMeta(tuple(f["shape"]), torch.float32)

    def factor(self, key: str) -> tuple[torch.Tensor, torch.Tensor, float, bool] | None:
        """(A, B, scale, transpose) of a factored tensor, None for a dense one."""
        f = self.factors.get(key)
        if f is None:
            return None
        return (self.inner.get(key + FACTOR_A), self.inner.get(key + FACTOR_B),
                float(f["scale"]), bool(f.get("transpose")))

    def get(self, key: str) -> torch.Tensor:
        parts = self.factor(key)
        if parts is None:
            return self.inner.get(key)
        return expand(*parts)

    def close(self) -> None:
        self.inner.close()


def factored_sq_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||scale * B @ A||_F^2 = scale^2 sum((B^T B) * (A A^T)): r x r products, nothing dense."""
    a, b = a.double(), b.double()
    return float(scale * scale * ((b.T @ b) * (a @ a.T)).sum())


def expand(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """The dense ``scale * B @ A`` (transposed if asked), fp32."""
    d = (b.to(torch.float32) @ a.to(torch.float32)).mul_(scale)
    return d.T.contiguous() if transpose else d


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
