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
from typing import Any

import torch

from tvtool.checkpoints.keymaps import BARE_TOWER_PREFIXES
from tvtool.errors import TvtoolError, few
from tvtool.store.manifest import Manifest
from tvtool.store.store import Store
from tvtool.vectors.resize import refuse_in_bank
from tvtool.vectors.stored import factored_tensors, open_tensor_object, vector_tensors

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
    on the device: tensor [L, n, *shape] (a partitioned stack is laid out by group at its first
    composition, see compose.mixing). Grouping keeps the number of kernels per step small
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
    factors: LowRank | None = None  # factored (LoRA) vectors: `tensor` is empty until expanded
    segments: Any = None  # partitioned: tensor laid out by group (compose.mixing.segment)

    @property
    def nbytes(self) -> int:
        if self.factors is not None:
            return sum(t.numel() * t.element_size() for t in (self.factors.a, self.factors.b))
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def expand(self) -> None:
        """Materialise factored vectors as the dense [L, n, *shape] stack (partitioned
        coefficients weight every element on its own, so they need the dense tensors)."""
        if self.factors is not None:
            with torch.no_grad():
                self.tensor = self.factors.dense(self.shape)
            self.factors = None


@dataclass
class LowRank:
    """The factors of L x n factored vectors: ``tau[l, j] = b[l, j] @ a[l, j]`` (transposed when
    `transpose`), the scale folded into `b`; ranks below `r` are zero-padded (padding adds
    nothing to the product). a: [L, n, r, in], b: [L, n, out, r]."""

    a: torch.Tensor
    b: torch.Tensor
    transpose: bool

    def mix(self, w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[L, *shape]: sum_j w[l, j] * tau[l, j] as one batched product of rank n * r."""
        L, n, out, r = self.b.shape
        bw = (self.b * w.to(self.b.dtype)[:, :, None, None]).permute(0, 2, 1, 3)
        d = torch.bmm(bw.reshape(L, out, n * r), self.a.reshape(L, n * r, -1))
        return (d.transpose(1, 2) if self.transpose else d).reshape(L, *shape)

    def dense(self, shape: tuple[int, ...]) -> torch.Tensor:
        d = torch.matmul(self.b, self.a)  # [L, n, out, in]
        return (d.transpose(2, 3) if self.transpose else d).reshape(*d.shape[:2], *shape)


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
        refuse_in_bank(label, manifest)  # a vocabulary resize: merge only
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
    tensor at a time. A key that only factored (LoRA) vectors cover is held as its factors
    (`Stack.factors`), never dense, unless partitions later need it (`Stack.expand`)."""
    factored = [factored_tensors(v.manifest) for v in plan.vectors]
    groups: dict[tuple, list] = {}
    for k in plan.keys:
        rows = tuple(t for t in k.rows if keep is None or keep(t, k.key))
        if not rows:
            continue
        low = len(k.shape) == 2 and all(k.key in factored[t] for t in rows)
        kind = ("lora", bool(factored[rows[0]][k.key].get("transpose"))) if low else ("dense",)
        groups.setdefault((k.shape, rows, kind), []).append(k)
    stacks: list[Stack] = []
    slot: dict[tuple[int, str], tuple[int, int, int]] = {}
    for (shape, rows, kind), members in groups.items():
        for l_, k in enumerate(members):
            for j, t in enumerate(rows):
                slot[(t, k.key)] = (len(stacks), l_, j)
        L, n = len(members), len(rows)
        keys, params = [k.key for k in members], [k.param for k in members]
        if kind[0] == "dense":
            tensor = torch.empty((L, n, *shape), dtype=dtype, device=device)
            stacks.append(Stack(keys, params, shape, list(rows), tensor))
            continue
        r = max(int(factored[t][k.key]["rank"]) for k in members for t in rows)
        out, inp = (shape[1], shape[0]) if kind[1] else shape
        low_rank = LowRank(
            torch.zeros((L, n, r, inp), dtype=dtype, device=device),
            torch.zeros((L, n, out, r), dtype=dtype, device=device),
            kind[1],
        )
        empty = torch.empty((L, n, 0), dtype=dtype, device=device)
        stacks.append(Stack(keys, params, shape, list(rows), empty, factors=low_rank))
    for t, v in enumerate(plan.vectors):
        wanted = [key for key in v.keys if (t, key) in slot]
        if not wanted:
            continue
        _, reader = open_tensor_object(store, v.digest, "vector")
        with reader, torch.no_grad():
            for key in wanted:
                s, l_, j = slot[(t, key)]
                f = stacks[s].factors
                if f is None:
                    stacks[s].tensor[l_, j].copy_(reader.get(key).to(dtype))
                    continue
                a, b, scale, _ = reader.factor(key)  # type: ignore[attr-defined]
                f.a[l_, j, : a.shape[0]].copy_(a.to(dtype))
                f.b[l_, j, :, : b.shape[1]].copy_((b.to(torch.float32) * scale).to(dtype))
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
    """Device bytes `load_stacks` would allocate (a factored pair: its factors, unpadded)."""
    size = torch.empty((), dtype=dtype).element_size()
    factored = [factored_tensors(v.manifest) for v in plan.vectors]

    def numel(t: int, k: BankKey) -> int:
        f = factored[t].get(k.key)
        if f is None or len(k.shape) != 2 or not all(k.key in factored[u] for u in k.rows):
            return math.prod(k.shape)
        return int(f["rank"]) * sum(k.shape)

    return sum(
        numel(t, k) * size for k in plan.keys for t in k.rows if keep is None or keep(t, k.key)
    )


def plan_from_vectors(store: Store, names: list[str]) -> BankPlan:
    """A bank over the vectors' own keys, for data-free scores (no model): every float tensor is
    in scope; vectors must agree on the shapes of the keys they share."""
    vectors: list[BankVector] = []
    shapes: dict[str, tuple[int, ...]] = {}
    rows: dict[str, list[int]] = {}
    for t, (digest, label, manifest) in enumerate(resolve_vectors(store, names)):
        refuse_in_bank(label, manifest)  # a vocabulary resize: merge only
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
