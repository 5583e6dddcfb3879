"""Persisted, schema-versioned manifests (pydantic). Torch-free."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tvtool import __version__

SCHEMA_VERSION = 1

ObjectKind = Literal["vector", "coefs", "selection", "mask", "merge", "head"]
DataFormat = Literal["safetensors", "json"]


class TensorInfo(BaseModel):
    """Name, shape and dtype of one stored tensor."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    dtype: str


class Manifest(BaseModel):
    """What a stored object is: written once beside its data blob, never changed.

    `digest` is the sha256 of the data blob and is the object's identity. `inputs` lists the
    digests of other store objects this one was made from (gc keeps them alive); `params` holds
    kind-specific fields (fingerprints of input checkpoints, filters, objective, ...).
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: ObjectKind
    digest: str
    size: int
    format: DataFormat
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    tool_version: str = __version__
    inputs: list[str] = Field(default_factory=list)
    tensors: list[TensorInfo] = Field(default_factory=list)
    numel: int = 0
    dtype: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8, trailing newline."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (text + "\n").encode()
