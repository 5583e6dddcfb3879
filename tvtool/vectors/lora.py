"""`tvtool extract BASE --lora ADAPTER`: a LoRA adapter as a *factored* task vector.

The adapter's change to each adapted weight is ``tau = s * B @ A`` (see `checkpoints.peft`); the
vector object stores ``A`` and ``B`` (``K::lora_A``, ``K::lora_B``) and records ``s``, the dense
shape and any transpose in ``params.factored``, so a rank-16 adapter of a 7B model stays tens of
MB. Whole tensors the adapter saves (``modules_to_save``; a ``lora_B.bias``) are stored dense as
``saved - base`` / ``s * bias``. Every consumer expands factors one tensor at a time through
`stored.FactoredReader`. The base is read for key names, shapes and its fingerprint, and for the
tensors stored whole. ``l2`` is computed from the factors: ``||s B A||^2 = s^2 sum((B^T B) *
(A A^T))`` (r x r products, nothing dense).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import torch

from tvtool.checkpoints.peft import Adapter, read_adapter
from tvtool.checkpoints.readers import CheckpointReader, open_checkpoint
from tvtool.checkpoints.writer import TensorSpec
from tvtool.errors import TvtoolError
from tvtool.store.store import Store, check_ref_name
from tvtool.vectors.extract import STORAGE_NAMES, ExtractResult, _source, stored_result
from tvtool.vectors.filters import TensorFilter
from tvtool.vectors.stored import FACTOR_A, FACTOR_B, factored_sq_norm, write_tensor_object

Source = tuple[str, str]  # (kind: A | B | whole | bias, base key)


def extract_lora(
    store: Store,
    base_path: str | Path,
    adapter_dir: str | Path,
    *,
    keep: TensorFilter | None = None,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    force: bool = False,
) -> ExtractResult:
    """Store the adapter's task vector, factored; tagged `name` if given."""
    if dtype not in STORAGE_NAMES:
        raise TvtoolError(f"cannot store task vectors as {dtype}: use fp32, fp16 or bf16")
    if name is not None:
        check_ref_name(name)
    keep = keep or TensorFilter()
    created = datetime.now(timezone.utc).isoformat()
    with open_checkpoint(base_path) as base:
        metas = {k: base.meta(k) for k in base.keys()}
        keep = keep.bind(metas)  # presets that depend on the layout (bare 5.x CLIP towers)
        adapter = read_adapter(adapter_dir, set(metas))
        with open_checkpoint(adapter.weights) as ad:
            _check_base_layers(adapter, base, ad)
            plan = _plan(adapter, metas, ad, keep)
            factors = {
                f.key: {"shape": list(f.shape), "scale": f.scale, "transpose": f.transpose,
                        "rank": int(ad.meta(f.a).shape[0])}
                for f in adapter.factors if keep(f.key)
            }
            factored_sq = sum(_factored_sq(ad, f, dtype) for f in adapter.factors if keep(f.key))
            kept = sorted({key for _, (_, key) in plan})
            params = {
                "base": _source(base),
                "lora": {"path": str(Path(adapter_dir).expanduser().resolve()),
                         "fingerprint": ad.fingerprint(), **adapter.describe()},
                "factored": {"format": "lora", "tensors": factors},
                "filters": keep.describe(),
                "filtered_out": len(_all_keys(adapter)) - len(kept),
                "storage_dtype": STORAGE_NAMES[dtype],
                "dense_numel": sum(metas[k].numel for k in kept),
                "l2": math.sqrt(factored_sq),
            }
            params["base_fingerprint"] = params["base"]["fingerprint"]
            source = dict(plan)
            dense_sq = [0.0]

            def produce(spec: TensorSpec) -> torch.Tensor:
                kind, key = source[spec.name]
                x = _tensor(kind, key, adapter, base, ad).to(dtype)
                if not bool(torch.isfinite(x).all()):
                    raise TvtoolError(f"the adapter's tensor for {key!r} has NaN/Inf values")
                if kind in ("whole", "bias"):
                    dense_sq[0] += float(x.double().square().sum())
                    params["l2"] = math.sqrt(factored_sq + dense_sq[0])
                return x

            specs = [TensorSpec(n, tuple(_shape(src, metas, ad, adapter)), dtype)
                     for n, src in plan]
            manifest = write_tensor_object(
                store, "vector", specs, produce, params=params, created=created
            )
    return stored_result(store, manifest, created, name, force, [], params["filtered_out"])


def _all_keys(adapter: Adapter) -> set[str]:
    return {f.key for f in adapter.factors} | set(adapter.whole) | set(adapter.biases)


def _plan(adapter: Adapter, metas, ad: CheckpointReader, keep) -> list[tuple[str, Source]]:
    """(stored name, source) per stored tensor, in name order; shapes checked."""
    out: list[tuple[str, Source]] = []
    for f in adapter.factors:
        if not keep(f.key):
            continue
        if tuple(metas[f.key].shape) != tuple(f.shape):
            raise TvtoolError(
                f"the adapter's {f.key} is {list(f.shape)}, the base's "
                f"{list(metas[f.key].shape)} (adapter of another model?)"
            )
        out += [(f.key + FACTOR_A, ("A", f.key)), (f.key + FACTOR_B, ("B", f.key))]
    for kind, table in (("whole", adapter.whole), ("bias", adapter.biases)):
        for key, entry in table.items():
            if not keep(key):
                continue
            name = entry if isinstance(entry, str) else entry[0]
            if tuple(ad.meta(name).shape) != tuple(metas[key].shape):
                raise TvtoolError(
                    f"the adapter's {name} is {list(ad.meta(name).shape)}, the base's {key} "
                    f"{list(metas[key].shape)} (resized vocabulary?)"
                )
            out.append((key, (kind, key)))
    if not out:
        raise TvtoolError("no tensors selected: check --include/--exclude/--preset")
    return sorted(out)


def _shape(src: Source, metas, ad: CheckpointReader, adapter: Adapter):
    kind, key = src
    if kind in ("A", "B"):
        f = adapter.factor(key)
        return ad.meta(f.a if kind == "A" else f.b).shape
    return metas[key].shape


def _tensor(kind: str, key: str, adapter: Adapter, base, ad) -> torch.Tensor:
    if kind in ("A", "B"):
        f = adapter.factor(key)
        return ad.get(f.a if kind == "A" else f.b)
    if kind == "bias":
        name, scale = adapter.biases[key]
        return ad.get(name).to(torch.float32) * scale
    return ad.get(adapter.whole[key]).to(torch.float32) - base.get(key).to(torch.float32)


def _factored_sq(ad: CheckpointReader, f, dtype: torch.dtype) -> float:
    """||s B A||_F^2 of the factors as stored (rounded to the storage dtype)."""
    return factored_sq_norm(ad.get(f.a).to(dtype), ad.get(f.b).to(dtype), f.scale)


def _check_base_layers(adapter: Adapter, base, ad) -> None:
    """Saved copies of base weights (``base_layer``) must be the base's: else the adapter was
    trained on other weights (or a resized vocabulary) and its vector would be wrong."""
    for key, name in adapter.base_layers.items():
        mine, theirs = base.get(key), ad.get(name)
        if tuple(mine.shape) != tuple(theirs.shape) or not torch.equal(
            mine.to(torch.float32), theirs.to(torch.float32)
        ):
            raise TvtoolError(
                f"the adapter's saved {name} differs from the base's {key} (the adapter was "
                "trained on other weights or a resized vocabulary)"
            )
