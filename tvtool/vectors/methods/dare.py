"""`dare`: DARE (Yu et al. 2024): drop each entry with probability p, rescale, then sum or TIES.

Rescale 1/(1-p) (the paper), or mergekit's per-tensor L1 matching (`--rescale l1`). With
`--then ties` the dropped vectors go through TIES' sign election and disjoint merge (mergekit's
`dare_ties`); they are trimmed again only when --density is given (then by top-k, global or per
tensor).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tvtool.vectors.methods.base import (
    NORMALIZE,
    SCOPE,
    SEED,
    Method,
    Params,
    TensorInfo,
    TermState,
    flag,
)


class DareParams(Params):
    method: Literal["dare"] = "dare"
    drop: float = Field(0.9, ge=0.0, lt=1.0, description="Drop probability p, in [0, 1).")
    rescale: Literal["inverse", "l1", "none"] = Field(
        "inverse", description="Rescale survivors by 1/(1-p), to the tensor's L1 norm, or not."
    )
    then: Literal["sum", "ties"] = Field("sum", description="Merge the dropped vectors with.")
    density: float | None = Field(
        None, ge=0.0, le=1.0, description="dare --then ties: also trim to this top fraction."
    )
    scope: Literal["global", "tensor"] = Field(
        "global", description=SCOPE, json_schema_extra=flag("--ties-scope")
    )
    normalize: bool = Field(True, description=NORMALIZE)
    seed: int = Field(0, description=SEED)

    @model_validator(mode="after")
    def _density_needs_ties(self) -> DareParams:
        if self.density is not None and self.then != "ties":
            raise ValueError("--density applies to dare only with --then ties")
        return self


class Dare(Method):
    name = "dare"
    summary = (
        "DARE: drop each entry with probability --drop, rescale (--rescale: 1/(1-p) or L1), "
        "seeded per vector and tensor name, then --then sum|ties."
    )
    Params = DareParams
    random = True

    def weighted_sum(self, p: DareParams) -> bool:
        return p.then == "sum"

    def whole_tensor(self, p: DareParams) -> bool:
        return True  # one random stream per tensor

    def _trims(self, p: DareParams) -> bool:
        return p.then == "ties" and p.density is not None

    def global_density(self, p: DareParams) -> float | None:
        return p.density if self._trims(p) and p.scope == "global" else None

    def before_trim(self, x, t: TensorInfo, term: TermState, p: DareParams):
        from tvtool.vectors.methods.ops import dare, dare_seed

        return dare(x, p.drop, dare_seed(p.seed, term.vector, t.key), p.rescale)

    def term(self, x, t: TensorInfo, term: TermState, p: DareParams, mask=None):
        from tvtool.vectors.methods.topk import trim

        x = self.before_trim(x, t, term, p)
        if self._trims(p):
            x = trim(x, p.density, term.topk if p.scope == "global" else None)
        return x

    def combine(self, base, xs, weights, scale, p: DareParams, t: TensorInfo):
        if p.then == "sum":
            return super().combine(base, xs, weights, scale, p, t)
        from tvtool.vectors.methods.ties import ties_combine

        return ties_combine(base, xs, weights, scale, p.normalize)


METHOD = Dare()
