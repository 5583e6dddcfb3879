"""Blocks: how tensors are grouped to share a coefficient, and the layout of a `coefs` object.

* `tensor` (default): one block per named tensor (aTLAS "block-wise", AdaMerging "layer-wise").
* `layer`: one block per transformer layer (keys grouped by a layer-index pattern); keys outside
  any layer are blocks of their own.
* `task`: one block for the whole vector (isotropic).
* `partitions=K` (with `tensor` only): each element of a weight with 2 or more dimensions is
  assigned, seeded and deterministically per name, to one of K groups, one coefficient per group
  (aTLAS x K). Other tensors keep one coefficient. `partition_rule="atlas"` follows the released
  aTLAS code (`src/composition.py`, `mask_multiply`): only 2-D weights are partitioned and the
  other tensors are not composed at all (their coefficients stay 0, see compose/coefs.py).

A `coefs` object is a safetensors blob with one tensor `coefs` of shape [T, G] (T vectors, G
groups in block order) and a `CoefsLayout` in its manifest's `params["layout"]`.
"""

from __future__ import annotations

import re
import zlib
from typing import Literal

from pydantic import BaseModel, ConfigDict

Granularity = Literal["tensor", "layer", "task"]
PartitionRule = Literal["tvtool", "atlas"]
LAYER_PATTERN = re.compile(r"^(.*?\b(?:resblocks|layers|layer|blocks|h)\.\d+)\.")


class BlockInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    keys: list[str]
    groups: int = 1


class CoefsLayout(BaseModel):
    """Which vectors (digests, in row order) and which blocks (column groups, in order)."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[str]
    blocks: list[BlockInfo]
    granularity: Granularity = "tensor"
    partitions: int = 1
    partition_seed: int = 0
    partition_rule: PartitionRule = "tvtool"

    @property
    def n_groups(self) -> int:
        return sum(b.groups for b in self.blocks)

    def offsets(self) -> list[int]:
        out, acc = [], 0
        for b in self.blocks:
            out.append(acc)
            acc += b.groups
        return out

    def key_index(self) -> dict[str, tuple[int, int]]:
        """key -> (block index, column offset of the block)."""
        idx = {}
        for i, (b, off) in enumerate(zip(self.blocks, self.offsets(), strict=True)):
            for k in b.keys:
                idx[k] = (i, off)
        return idx


def layer_of(key: str) -> str:
    m = LAYER_PATTERN.match(key)
    return m.group(1) if m else key


def make_blocks(
    shapes: dict[str, tuple[int, ...]],
    granularity: Granularity = "tensor",
    partitions: int = 1,
    rule: PartitionRule = "tvtool",
) -> list[BlockInfo]:
    """Group `shapes` (key -> shape, in the order to keep) into blocks."""
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    if partitions > 1 and granularity != "tensor":
        raise ValueError("partitions need --granularity tensor")
    if granularity == "task":
        return [BlockInfo(name="all", keys=list(shapes), groups=1)]
    if granularity == "layer":
        grouped: dict[str, list[str]] = {}
        for k in shapes:
            grouped.setdefault(layer_of(k), []).append(k)
        return [BlockInfo(name=n, keys=ks, groups=1) for n, ks in grouped.items()]
    return [
        BlockInfo(name=k, keys=[k], groups=partitions if partitioned(s, partitions, rule) else 1)
        for k, s in shapes.items()
    ]


def partitioned(shape: tuple[int, ...], partitions: int, rule: PartitionRule = "tvtool") -> bool:
    """Is a tensor of `shape` split into `partitions` groups? tvtool: every tensor of 2 or more
    dimensions (conv kernels, embeddings included); atlas: exactly the 2-D weights."""
    if partitions <= 1:
        return False
    return len(shape) == 2 if rule == "atlas" else len(shape) >= 2


def partition_ids(key: str, shape: tuple[int, ...], k: int, seed: int):
    """Group index (0..k-1) of every element of tensor `key`, seeded per name (LongTensor)."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return torch.randint(0, k, tuple(shape), generator=g)


def coef_for_key(row, key: str, shape: tuple[int, ...], layout: CoefsLayout, index=None):
    """The coefficient(s) of one vector (its row of `coefs`, a 1-D tensor) for tensor `key`:
    a scalar tensor, or a tensor of `shape` when the block is partitioned."""
    index = index or layout.key_index()
    b, off = index[key]
    groups = layout.blocks[b].groups
    if groups == 1:
        return row[off]
    ids = partition_ids(key, shape, groups, layout.partition_seed).to(row.device)
    return row[off : off + groups][ids]
