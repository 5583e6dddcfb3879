"""A merge's recipe and provenance: what `merge` records in the store and in the file's
`__metadata__`, the HF-style output layout, and reading provenance back. Torch-free.

The recipe (canonical JSON, stored as a `merge` object) holds everything but the base checkpoint
itself: the base's sha256, the method and its parameters, every vector/mask/coefs digest and
each term's resolved weight. `request_from_recipe` turns it back into a `MergeRequest`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvtool import __version__
from tvtool.errors import TvtoolError
from tvtool.vectors.terms import Term

if TYPE_CHECKING:
    from tvtool.checkpoints.writer import TensorSpec
    from tvtool.store.store import Store

RECIPE_FORMAT = "tvtool.merge/1"
META_PREFIX = "tvtool."


@dataclass
class MergeRequest:
    """Everything `tvtool merge` was asked to do (the CLI's options, parsed)."""

    base: Path
    out: Path
    terms: list[Term] = field(default_factory=list)
    method: str = "sum"
    scale: float | None = None
    density: float = 0.2
    scope: str = "global"
    drop: float = 0.9
    then: str = "sum"
    seed: int = 0
    coefs: str | None = None
    masks: list[str] = field(default_factory=list)
    dtype: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    allow_missing: bool = False
    shard_size: int | None = None
    force: bool = False
    expect_base: str | None = None  # sha256 the base must have (rebuilding from a recipe)

    def __post_init__(self) -> None:
        self.base, self.out = Path(self.base).expanduser(), Path(self.out).expanduser()


def build_recipe(
    req: MergeRequest,
    fingerprint: str,
    params: dict[str, Any],
    terms: list[tuple[str, float, str | None]],
    coefs: str | None,
) -> dict[str, Any]:
    """The recipe document; `terms` are (vector digest, weight, mask digest or None)."""
    return {
        "format": RECIPE_FORMAT,
        "base": fingerprint,
        "method": req.method,
        "params": {
            **params,
            "dtype": req.dtype,
            "include": req.include,
            "exclude": req.exclude,
            "allow_missing": req.allow_missing,
            "shard_size": req.shard_size,
        },
        "terms": [{"vector": v, "weight": w, "mask": m} for v, w, m in terms],
        "coefs": coefs,
    }


def provenance_metadata(recipe: dict[str, Any], digest: str) -> dict[str, str]:
    """`__metadata__` of the output: strings only, no timestamps (same inputs, same bytes)."""
    terms = recipe["terms"]
    meta = {
        "format": "pt",
        "tvtool.version": __version__,
        "tvtool.base_fingerprint": recipe["base"],
        "tvtool.method": recipe["method"],
        "tvtool.params": json.dumps(recipe["params"], sort_keys=True, separators=(",", ":")),
        "tvtool.vectors": json.dumps([t["vector"] for t in terms]),
        "tvtool.weights": json.dumps([t["weight"] for t in terms]),
        "tvtool.merge": digest,
    }
    if recipe.get("coefs"):
        meta["tvtool.coefs"] = recipe["coefs"]
    if any(t.get("mask") for t in terms):
        meta["tvtool.masks"] = json.dumps([t["mask"] for t in terms])
    return dict(sorted(meta.items()))


def output_files(
    out: Path, specs: list[TensorSpec], shard_size: int | None
) -> tuple[list[tuple[Path, list[TensorSpec]]], Path | None]:
    """One file at `out`; or, past `shard_size`, HF-style shards beside it,
    `{stem}-00001-of-0000N.safetensors`, plus `{stem}.safetensors.index.json`, where `stem` is
    `out`'s name without `.safetensors` (`model.safetensors` gives the usual HF names).
    Tensors are packed greedily in key order; a tensor larger than a shard gets its own."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shard_size and groups[-1] and size + s.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    if len(groups) == 1:
        return [(out, groups[0])], None
    stem, n = out.name.removesuffix(".safetensors"), len(groups)
    files = [
        (out.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"), g)
        for i, g in enumerate(groups)
    ]
    return files, out.with_name(f"{stem}.safetensors.index.json")


def index_document(files: list[tuple[Path, list[TensorSpec]]], metadata: dict[str, str]) -> bytes:
    """The shard index (`weight_map` + `metadata.total_size`, plus the provenance strings)."""
    weight_map = {s.name: path.name for path, specs in files for s in specs}
    total = sum(s.nbytes for _, specs in files for s in specs)
    doc = {"metadata": {**metadata, "total_size": total}, "weight_map": weight_map}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def request_from_recipe(
    store: Store, ref: str, base: Path, out: Path, force: bool = False
) -> MergeRequest:
    """Rebuild a merge from its stored recipe (a `merge` object) and the same base checkpoint."""
    recipe = store.read_json(store.resolve(ref, kind="merge"))
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise TvtoolError(f"{ref!r} is not a merge recipe this tvtool can read")
    prm, coefs = recipe["params"], recipe.get("coefs")
    terms = [] if coefs else [Term(ref=t["vector"], weight=t["weight"]) for t in recipe["terms"]]
    return MergeRequest(
        base=base,
        out=out,
        force=force,
        expect_base=recipe["base"],
        method=recipe["method"],
        terms=terms,
        masks=[t["mask"] for t in recipe["terms"] if t.get("mask")],
        coefs=coefs,
        scale=prm["scale"],
        density=prm.get("density", 0.2),
        scope=prm.get("scope", "global"),
        drop=prm.get("drop", 0.9),
        then=prm.get("then", "sum"),
        seed=prm.get("seed", 0),
        dtype=prm.get("dtype"),
        include=prm.get("include", []),
        exclude=prm.get("exclude", []),
        allow_missing=prm.get("allow_missing", False),
        shard_size=prm.get("shard_size"),
    )


# -- reading provenance back ----------------------------------------------------------------------
def read_metadata(path: Path) -> tuple[Path, dict[str, Any]]:
    """`__metadata__` of a safetensors file, or `metadata` of a shard index (a directory: its
    index, else its single .safetensors file). Reads the header only."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise TvtoolError(
                f"{path}: expected one index or one .safetensors file, found {len(found)}"
            )
        path = found[0]
    if not path.exists():
        raise TvtoolError(f"file not found: {path}")
    try:
        if path.name.endswith(".json"):
            return path, dict(json.loads(path.read_text()).get("metadata") or {})
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 30:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        return path, dict(header.get("__metadata__") or {})
    except (OSError, ValueError, struct.error, AttributeError) as e:
        raise TvtoolError(f"{path}: not a safetensors file or shard index ({e})") from None


def decode_provenance(metadata: dict[str, Any]) -> dict[str, Any]:
    """The tvtool fields of a metadata dict, JSON values decoded (empty if not from tvtool)."""
    out: dict[str, Any] = {}
    for key, value in sorted(metadata.items()):
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX) :]
        try:
            out[name] = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value
        except ValueError:
            out[name] = value
    return out
