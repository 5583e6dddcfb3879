"""A merge's request and recipe (pydantic), its provenance strings and the HF-style output
layout; reading provenance back. Torch-free.

`MergeRequest` is what `tvtool merge` (or a library caller) asks for. `MergeRecipe` is what is
recorded: everything but the base checkpoint itself (its sha256), the method's params (the
registry's discriminated union), the resolved scale and term weights, every vector/mask/coefs
digest and checkpoint fingerprint. It is stored with `model_dump` and read back with
`model_validate` (a stored or crafted recipe that does not validate is one clear error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from tvtool import __version__
from tvtool.checkpoints.header import read_header, read_index
from tvtool.errors import TvtoolError
from tvtool.vectors.methods import (
    METHODS,
    MethodParams,
    make_params,
    param_fields,
)
from tvtool.vectors.methods.task_arithmetic import SumParams
from tvtool.vectors.terms import MAX_WEIGHT, Term

if TYPE_CHECKING:
    from tvtool.checkpoints.writer import TensorSpec
    from tvtool.store.store import Store

RECIPE_FORMAT = "tvtool.merge/2"
META_PREFIX = "tvtool."
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
_PARAM_NAMES = {k for m in METHODS.values() for k in param_fields(m)}


class OutputOptions(BaseModel):
    """How the output is written (recorded: they change its bytes)."""

    model_config = ConfigDict(extra="forbid")
    dtype: str | None = None
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    allow_missing: bool = False
    shard_size: int | None = Field(None, ge=1)


class MergeRequest(OutputOptions):
    """Everything `tvtool merge` was asked to do. For convenience the method's parameters may
    be given flat (`method="ties", density=0.3`): they are validated by the method's Params."""

    model_config = ConfigDict(extra="forbid")
    base: Path
    out: Path
    terms: list[Term] = Field(default_factory=list)
    method: MethodParams = Field(default_factory=SumParams)
    scale: Weight | None = None
    coefs: str | None = None
    masks: list[str] = Field(default_factory=list)
    force: bool = False
    name: str | None = None  # tag the stored recipe
    allow_other_base: bool = False
    expect_base: str | None = None  # sha256 the base must have (rebuilding from a recipe)
    expect_terms: list[str | None] = Field(default_factory=list)  # checkpoint sha256 per term

    @model_validator(mode="before")
    @classmethod
    def _flat_params(cls, data: Any) -> Any:
        if isinstance(data, dict) and not isinstance(data.get("method"), BaseModel | dict):
            data = dict(data)
            given = {k: data.pop(k) for k in list(data) if k in _PARAM_NAMES}
            data["method"] = make_params(str(data.get("method") or "sum"), given)
        return data

    @model_validator(mode="after")
    def _paths(self) -> MergeRequest:
        self.base, self.out = Path(self.base).expanduser(), Path(self.out).expanduser()
        return self

    @property
    def method_name(self) -> str:
        return self.method.method


def merge_request(**fields: Any) -> MergeRequest:
    """`MergeRequest(**fields)` with validation errors as one line."""
    try:
        return MergeRequest(**fields)
    except ValidationError as e:
        raise TvtoolError(_one_line(e)) from None


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if loc in MergeRequest.model_fields:  # a request field: name its option
            loc = "--" + loc.replace("_", "-")
        msg = str(err["msg"]).replace("Value error, ", "")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class RecipeTerm(BaseModel):
    """One term: a stored vector (`vector`) or a checkpoint merged on the fly (`checkpoint`,
    its content sha256, and `path` as given)."""

    model_config = ConfigDict(extra="forbid")
    vector: Sha256 | None = None
    checkpoint: Sha256 | None = None
    path: str | None = None
    weight: Weight
    mask: Sha256 | None = None

    @model_validator(mode="after")
    def _one_source(self) -> RecipeTerm:
        if (self.vector is None) == (self.checkpoint is None):
            raise ValueError("a term has exactly one of vector or checkpoint")
        return self


class MergeRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["tvtool.merge/2"] = RECIPE_FORMAT
    base: Sha256
    method: MethodParams
    scale: Weight
    terms: list[RecipeTerm]
    coefs: Sha256 | None = None
    output: OutputOptions = Field(default_factory=OutputOptions)

    def params(self) -> dict[str, Any]:
        """Flat parameters for people and metadata: scale, the method's, the output's."""
        method = self.method.model_dump(mode="json", exclude={"method"})
        return {"scale": self.scale, **method, **self.output.model_dump(mode="json")}

    def document(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def provenance_metadata(recipe: MergeRecipe, digest: str) -> dict[str, str]:
    """`__metadata__` of the output: strings only, no timestamps (same inputs, same bytes)."""
    compact = {"sort_keys": True, "separators": (",", ":")}
    meta = {
        "format": "pt",
        "tvtool.version": __version__,
        "tvtool.base_fingerprint": recipe.base,
        "tvtool.method": recipe.method.method,
        "tvtool.params": json.dumps(recipe.params(), **compact),
        "tvtool.vectors": json.dumps([t.vector or t.checkpoint for t in recipe.terms]),
        "tvtool.weights": json.dumps([t.weight for t in recipe.terms]),
        "tvtool.merge": digest,
    }
    if recipe.coefs:
        meta["tvtool.coefs"] = recipe.coefs
    if any(t.mask for t in recipe.terms):
        meta["tvtool.masks"] = json.dumps([t.mask for t in recipe.terms])
    if any(t.checkpoint for t in recipe.terms):
        meta["tvtool.checkpoints"] = json.dumps([t.path for t in recipe.terms])
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


def load_recipe(doc: Any, what: str) -> MergeRecipe:
    """A recipe document validated (one line on anything malformed or crafted)."""
    if isinstance(doc, dict) and doc.get("format") == "tvtool.merge/1":
        raise TvtoolError(f"{what} was recorded by an older tvtool (tvtool.merge/1): merge again")
    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT:
        raise TvtoolError(f"{what} is not a merge recipe this tvtool can read")
    try:
        return MergeRecipe.model_validate(doc)
    except ValidationError as e:
        raise TvtoolError(f"{what} is not a valid merge recipe: {_one_line(e)}") from None


def request_from_recipe(
    store: Store, ref: str, base: Path, out: Path, force: bool = False, **extra: Any
) -> MergeRequest:
    """Rebuild a merge from its stored recipe (a `merge` object) and the same base checkpoint
    (checkpoint terms are read again from their recorded paths and must have the same sha256)."""
    digest = store.resolve(ref, kind="merge")
    try:
        doc = store.read_json(digest)
    except (ValueError, UnicodeDecodeError):
        doc = None
    recipe = load_recipe(doc, f"merge {ref!r}")
    terms = [] if recipe.coefs else [
        Term(ref=t.vector or str(t.path), weight=t.weight) for t in recipe.terms
    ]
    if any(t.checkpoint and not t.path for t in recipe.terms):
        raise TvtoolError(f"merge {ref!r}: a checkpoint term has no recorded path")
    return MergeRequest(
        base=base,
        out=out,
        force=force,
        expect_base=recipe.base,
        expect_terms=[t.checkpoint for t in recipe.terms] if not recipe.coefs else [],
        method=recipe.method,
        terms=terms,
        masks=[t.mask for t in recipe.terms if t.mask],
        coefs=recipe.coefs,
        scale=recipe.scale,
        **recipe.output.model_dump(),
        **extra,
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
    if path.name.endswith(".json"):
        return path, dict(read_index(path)[1])
    return path, dict(read_header(path).metadata)


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
