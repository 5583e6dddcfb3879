"""The bank of task vectors a run learns over: resolved, checked against the model, loaded.

`plan_bank` reads only manifests and safetensors headers: it maps each vector's keys to the
model's image-tower parameters (vectors keyed like the whole model, or like a bare image tower),
ignores keys outside the tower (the text tower does not change image features) and fails with a
clear error on keys the model lacks, on shape mismatches and, when the vector records the
fingerprint of the base it was extracted from, on a different base.

`load_stacks` then puts, for every parameter, the kept vectors' tensors on the device as one
stack [n, *shape] in the chosen dtype, reading one tensor at a time (host peak: one tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from tvtool.checkpoints.keymaps import BARE_TOWER_PREFIXES
from tvtool.errors import TvtoolError, few
from tvtool.store.manifest import Manifest
from tvtool.store.store import Store
from tvtool.vectors.stored import open_tensor_object, vector_tensors

VISUAL = "visual."
SHOW = 4


@dataclass
class BankVector:
    digest: str
    label: str  # ref name or short digest, for people
    manifest: Manifest
    keys: list[str] = field(default_factory=list)  # in-scope keys (vector names), model order
    ignored: int = 0  # keys outside the image tower


@dataclass
class BankKey:
    key: str  # the name in the vectors and in the coefs layout
    param: str  # the model parameter it updates ("visual....")
    shape: tuple[int, ...]
    rows: list[int]  # vectors (row indices) that cover it


@dataclass
class BankPlan:
    vectors: list[BankVector]
    keys: list[BankKey]  # in model parameter order

    @property
    def digests(self) -> list[str]:
        return [v.digest for v in self.vectors]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k.key: k.shape for k in self.keys}


@dataclass
class Stack:
    """The kept vectors' tensors for L parameters of one shape that the same n vectors cover,
    on the device: tensor [L, n, *shape]. Grouping keeps the number of kernels per step small
    (one batched product per group instead of one per parameter)."""

    keys: list[str]  # the names in the vectors and the layout (L)
    params: list[str]  # the model parameters they update (L)
    shape: tuple[int, ...]
    rows: list[int]  # the vectors (row indices of Lambda), n
    tensor: torch.Tensor
    groups: int = 1  # coefficient columns per parameter (partitions), set by attach_layout
    ids: torch.Tensor | None = None  # [L, *shape] partition of every element (small ints)
    index: tuple[torch.Tensor, torch.Tensor] | None = None  # gathers Lambda -> [L, n, groups]
    base: torch.Tensor | None = None  # [L, *shape] base weights, when shared (share_base)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def recorded_base(manifest: Manifest) -> str | None:
    """The fingerprint of the base checkpoint a vector was extracted from, if recorded."""
    base = manifest.params.get("base")
    if isinstance(base, dict) and isinstance(base.get("fingerprint"), str):
        return base["fingerprint"]
    fp = manifest.params.get("base_fingerprint")
    return fp if isinstance(fp, str) else None


def resolve_vectors(store: Store, names: list[str]) -> list[tuple[str, str, Manifest]]:
    """(digest, label, manifest) per name; a vector named twice is an error."""
    if not names:
        raise TvtoolError("give at least one task vector")
    out, seen = [], {}
    for n in names:
        d = store.resolve(n, kind="vector")
        if d in seen:
            raise TvtoolError(f"vector {n!r} is given twice (same object as {seen[d]!r})")
        seen[d] = n
        out.append((d, store.display_name(d), store.manifest(d)))
    return out


def plan_bank(
    store: Store,
    names: list[str],
    params: Mapping[str, torch.Tensor],
    model_keys: set[str],
    base_fingerprint: str | None = None,
    allow_other_base: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> BankPlan:
    """Map every vector onto the image-tower `params` (name -> tensor, model order)."""
    order = {p: i for i, p in enumerate(params)}
    vectors: list[BankVector] = []
    covered: dict[str, list[int]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    param_of: dict[str, str] = {}
    for t, (digest, label, manifest) in enumerate(resolve_vectors(store, names)):
        if manifest.format != "safetensors":
            raise TvtoolError(f"vector {label} is not a tensor object")
        recorded = recorded_base(manifest)
        if recorded and base_fingerprint and recorded != base_fingerprint:
            msg = (
                f"vector {label} was extracted from another base (sha256 {recorded[:12]}, the "
                f"model's is {base_fingerprint[:12]})"
            )
            if not allow_other_base:
                raise TvtoolError(msg + "; pass --allow-other-base if the weights are the same")
            if on_warning:
                on_warning(msg)
        vshapes = {ti.name: tuple(ti.shape) for ti in vector_tensors(manifest)}
        mapping = _map_keys(label, vshapes, params, model_keys)
        bv = BankVector(digest, label, manifest)
        for key, shape in vshapes.items():
            param = mapping.get(key)
            if param is None:
                bv.ignored += 1
                continue
            want = tuple(params[param].shape)
            if shape != want:
                raise TvtoolError(
                    f"vector {label}: tensor {key} has shape {list(shape)} but the model's "
                    f"{param} is {list(want)} (vector from another base or architecture?)"
                )
            if key in param_of and param_of[key] != param:
                raise TvtoolError(
                    f"vector {label}: {key} maps to {param}, another vector's to {param_of[key]}"
                )
            param_of[key] = param
            shapes[key] = shape
            covered.setdefault(key, []).append(t)
        bv.keys = sorted((k for k in vshapes if k in mapping), key=lambda k: order[mapping[k]])
        if not bv.keys:
            raise TvtoolError(f"vector {label} has no image-tower tensors: nothing to learn for it")
        vectors.append(bv)
    keys = sorted(covered, key=lambda k: order[param_of[k]])
    return BankPlan(vectors, [BankKey(k, param_of[k], shapes[k], covered[k]) for k in keys])


def _map_keys(
    label: str,
    vshapes: Mapping[str, tuple[int, ...]],
    params: Mapping[str, torch.Tensor],
    model_keys: set[str],
) -> dict[str, str]:
    """vector key -> image-tower parameter; keys of the model outside the tower are left out."""
    keys = list(vshapes)
    if all(k in model_keys for k in keys):
        return {k: k for k in keys if k in params}
    for prefix in BARE_TOWER_PREFIXES:  # a vector of a bare image tower (open_clip, HF 5.x)
        if all(prefix + k in params for k in keys):
            return {k: prefix + k for k in keys}
    unknown = [k for k in keys if k not in model_keys]
    raise TvtoolError(
        f"vector {label} has {len(unknown)} tensor(s) the model does not have: "
        f"{few(unknown, SHOW)} (vector from another architecture?)"
    )


def load_stacks(
    store: Store,
    plan: BankPlan,
    device: torch.device,
    dtype: torch.dtype,
    keep: Callable[[int, str], bool] | None = None,
) -> list[Stack]:
    """The kept (vector, key) pairs on `device`, grouped by (shape, kept vectors), read one
    tensor at a time."""
    groups: dict[tuple, list] = {}
    for k in plan.keys:
        rows = tuple(t for t in k.rows if keep is None or keep(t, k.key))
        if rows:
            groups.setdefault((k.shape, rows), []).append(k)
    stacks: list[Stack] = []
    slot: dict[tuple[int, str], tuple[int, int, int]] = {}
    for (shape, rows), members in groups.items():
        for l_, k in enumerate(members):
            for j, t in enumerate(rows):
                slot[(t, k.key)] = (len(stacks), l_, j)
        tensor = torch.empty((len(members), len(rows), *shape), dtype=dtype, device=device)
        keys, params = [k.key for k in members], [k.param for k in members]
        stacks.append(Stack(keys, params, shape, list(rows), tensor))
    for t, v in enumerate(plan.vectors):
        wanted = [key for key in v.keys if (t, key) in slot]
        if not wanted:
            continue
        _, reader = open_tensor_object(store, v.digest, "vector")
        with reader, torch.no_grad():
            for key in wanted:
                s, l_, j = slot[(t, key)]
                stacks[s].tensor[l_, j].copy_(reader.get(key).to(dtype))
    return stacks


def share_base(stacks: list[Stack], params: Mapping[str, torch.Tensor]) -> None:
    """Stack every group's base weights once ([L, *shape]) and make the model's parameters
    views of that stack, so the composition reads them without a copy per step and memory holds
    them once."""
    with torch.no_grad():
        for s in stacks:
            base = torch.stack([params[p].detach() for p in s.params])
            for i, p in enumerate(s.params):
                params[p].data = base[i]
            s.base = base


def stored_bytes(
    plan: BankPlan, dtype: torch.dtype, keep: Callable[[int, str], bool] | None = None
) -> int:
    """Device bytes `load_stacks` would allocate."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        math.prod(k.shape) * size * sum(1 for t in k.rows if keep is None or keep(t, k.key))
        for k in plan.keys
    )


def plan_from_vectors(store: Store, names: list[str]) -> BankPlan:
    """A bank over the vectors' own keys, for data-free scores (no model): every float tensor is
    in scope; vectors must agree on the shapes of the keys they share."""
    vectors: list[BankVector] = []
    shapes: dict[str, tuple[int, ...]] = {}
    rows: dict[str, list[int]] = {}
    for t, (digest, label, manifest) in enumerate(resolve_vectors(store, names)):
        bv = BankVector(digest, label, manifest)
        for ti in vector_tensors(manifest):
            shape = tuple(ti.shape)
            if shapes.setdefault(ti.name, shape) != shape:
                raise TvtoolError(
                    f"vector {label}: {ti.name} has shape {list(shape)}, another vector's is "
                    f"{list(shapes[ti.name])} (vectors of different architectures?)"
                )
            rows.setdefault(ti.name, []).append(t)
            bv.keys.append(ti.name)
        vectors.append(bv)
    return BankPlan(vectors, [BankKey(k, k, shapes[k], rows[k]) for k in shapes])
