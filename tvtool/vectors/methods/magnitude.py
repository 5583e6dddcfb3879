"""`magnitude`: keep each vector's top --density entries by |tau|, then task arithmetic."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tvtool.vectors.methods.base import DENSITY, SCOPE, Method, Params, TensorInfo, TermState, flag


class MagnitudeParams(Params):
    method: Literal["magnitude"] = "magnitude"
    density: float = Field(0.2, ge=0.0, le=1.0, description=DENSITY)
    scope: Literal["global", "tensor"] = Field(
        "global", description=SCOPE, json_schema_extra=flag("--ties-scope")
    )


class Magnitude(Method):
    name = "magnitude"
    summary = "keep each vector's top --density by |tau|, then sum."
    Params = MagnitudeParams

    def whole_tensor(self, p: MagnitudeParams) -> bool:
        return p.scope == "tensor"

    def global_density(self, p: MagnitudeParams) -> float | None:
        return p.density if p.scope == "global" else None

    def term(self, x, t: TensorInfo, term: TermState, p: MagnitudeParams, mask=None):
        from tvtool.vectors.methods.topk import trim

        return trim(x, p.density, term.topk if p.scope == "global" else None)


METHOD = Magnitude()
