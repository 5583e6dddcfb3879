"""`tvtool merge --config FILE`: a mergekit-style YAML or JSON recipe file. Torch-free.

    base: path/to/base          # mergekit: base_model
    method: ties                # mergekit: merge_method
    params: {density: 0.5}      # mergekit: parameters (the method's Params, validated)
    scale: 1.0                  # optional (the --scale rule otherwise)
    terms:                      # mergekit: models ({model: X, parameters: {weight: w}})
      - cars:0.3                # VECTOR[:WEIGHT] (a ref, digest or checkpoint path)
      - {vector: ft.safetensors, weight: 0.5}
    out: merged/                # optional; also dtype, include, exclude, shard_size, name ...

The file becomes a `MergeRequest` (one pydantic model, the same as the command line's); paths
in it are relative to the file's folder. Options given on the command line override it.

A file in mergekit's spelling (``merge_method:``) means what it means to mergekit
(`from_mergekit`): ``task_arithmetic`` is `sum`; ``linear`` is `sum` with the weights divided by
their sum (``normalize: false`` keeps them); ``ties`` trims per tensor; ``dare_ties`` /
``dare_linear`` are `dare` then TIES' election / a sum, mergekit's ``density`` (the keep
probability) read as ``drop = 1 - density`` and its default rescale (to the tensor's L1 norm,
``rescale: false``: none); ``lambda`` is `scale`; ``out_dtype`` (else ``dtype``) the output
dtype (tvtool always merges in float32). ``tokenizer_source`` is refused: tvtool reads no
tokenizer (vocabulary resizes: ``extract --allow-resize``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tvtool.errors import TvtoolError
from tvtool.vectors.terms import Term, parse_size, parse_term


class ConfigTerm(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    vector: str = Field(alias="model")
    weight: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _only_weight(self) -> ConfigTerm:
        extra = sorted(set(self.parameters) - {"weight"})
        if extra:
            raise ValueError(f"per-term parameters other than weight are not supported: {extra}")
        if "weight" in self.parameters:
            self.weight = float(self.parameters["weight"])
        return self


class MergeConfig(BaseModel):
    """The file's fields (mergekit's names accepted as aliases)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    base: str | None = Field(None, alias="base_model")
    out: str | None = None
    method: str = Field("sum", alias="merge_method")
    params: dict[str, Any] = Field(default_factory=dict, alias="parameters")
    scale: float | None = None
    terms: list[str | ConfigTerm] = Field(default_factory=list, alias="models")
    coefs: str | None = None
    masks: list[str] = Field(default_factory=list)
    dtype: str | None = None
    out_dtype: str | None = None  # mergekit: the output dtype (wins over dtype)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    allow_missing: bool = False
    allow_other_base: bool = False
    shard_size: int | str | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):  # accept both spellings of every aliased field
            renames = {"base": "base_model", "method": "merge_method", "params": "parameters",
                       "terms": "models"}
            data = {renames.get(k, k): v for k, v in data.items()}
        return data


_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch's (mergekit) names
MERGEKIT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (method, fixed params)
    "task_arithmetic": ("sum", {}),
    "linear": ("sum", {}),
    "ties": ("ties", {"scope": "tensor"}),
    "dare_ties": ("dare", {"then": "ties", "rescale": "l1", "scope": "tensor"}),
    "dare_linear": ("dare", {"then": "sum", "rescale": "l1"}),
}


def from_mergekit(cfg: MergeConfig, terms: list[Term]) -> tuple[str, dict[str, Any], list[Term]]:
    """(method, params, terms) of a file in mergekit's spelling, with mergekit's meaning."""
    params = dict(cfg.params)
    name = cfg.method
    method, fixed = MERGEKIT_METHODS.get(name, (name, {}))
    lam = params.pop("lambda", None)
    if name in ("task_arithmetic", "linear"):  # explicit weights; lambda scales their sum
        if any(t.weight is None for t in terms):
            raise TvtoolError(f"--config: merge_method {name} needs a weight for every model")
        total = sum(t.resolved_weight(0.0) for t in terms)
        if name == "linear" and params.pop("normalize", True):
            if total == 0:
                raise TvtoolError("--config: the linear weights sum to 0 (normalize: false?)")
            lam = (1.0 if lam is None else float(lam)) / total
        if lam is not None:
            terms = [Term(t.ref, t.weight * float(lam), t.negate) for t in terms]  # type: ignore
    elif lam is not None:
        if cfg.scale is not None:
            raise TvtoolError("--config: give lambda or scale, not both")
        cfg.scale = float(lam)
    if name in ("dare_ties", "dare_linear"):
        if "density" in params:
            params["drop"] = 1.0 - float(params.pop("density"))
        if params.pop("rescale", True) is False:
            params["rescale"] = "none"
    return method, {**fixed, **params}, terms


def _terms(cfg: MergeConfig, root: Path) -> list[Term]:
    out = []
    for t in cfg.terms:
        if isinstance(t, str):
            term = parse_term(t)
        else:
            term = parse_term(t.vector)
            if t.weight is not None:
                if term.weight is not None:
                    raise TvtoolError(f"term {t.vector!r}: the weight is given twice")
                term = Term(term.ref, t.weight, term.negate)
        candidate = root / term.ref
        if not Path(term.ref).is_absolute() and candidate.exists():
            term = Term(str(candidate), term.weight, term.negate)
        out.append(term)
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The MergeRequest fields a config file asks for (validated; one line on any error)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise TvtoolError(f"--config {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise TvtoolError(f"--config {path}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise TvtoolError(
                "--config with YAML needs pyyaml: pip install 'tvtool[hf]' (or pyyaml), "
                "or write the recipe as .json"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise TvtoolError(f"--config {path}: not valid YAML ({first})") from None
    if not isinstance(doc, dict):
        raise TvtoolError(f"--config {path}: expected a mapping (base, method, terms ...)")
    if "tokenizer_source" in doc or "tokenizer" in doc:
        raise TvtoolError(
            f"--config {path}: tokenizer_source is not supported: tvtool reads no tokenizer and "
            "writes the base's; for added tokens extract with --allow-resize (README: "
            "Vocabulary resizes)")
    try:
        cfg = MergeConfig.model_validate(doc)
    except ValidationError as e:
        errors = e.errors()
        first = next((x for x in errors if x["type"] == "value_error"), errors[0])
        loc = ".".join(str(x) for x in first["loc"])
        msg = str(first["msg"]).replace("Value error, ", "")
        raise TvtoolError(f"--config {path}: {loc + ': ' if loc else ''}{msg}") from None
    root = path.parent
    method, params, terms = cfg.method, cfg.params, _terms(cfg, root)
    if "merge_method" in doc:  # mergekit's spelling: mergekit's meaning
        method, params, terms = from_mergekit(cfg, terms)
    fields: dict[str, Any] = {
        "method": method,
        **params,
        "terms": terms,
        **{k: getattr(cfg, k) for k in ("scale", "coefs", "masks", "include", "exclude",
                                       "allow_missing", "allow_other_base", "name")},
        "dtype": _DTYPES.get(str(cfg.out_dtype or cfg.dtype).lower(), cfg.out_dtype or cfg.dtype),
    }
    if cfg.shard_size is not None:
        fields["shard_size"] = (
            parse_size(cfg.shard_size) if isinstance(cfg.shard_size, str) else cfg.shard_size
        )
    for key in ("base", "out"):
        value = getattr(cfg, key)
        if value is not None:
            p = Path(value).expanduser()
            fields[key] = p if p.is_absolute() else root / p
    return fields
