"""`ties`: TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

x_t = w_t * trim(tau_t) (top int(density*N) by |tau|, over the whole vector or per tensor);
theta = theta_0 + scale * elect_and_merge(x) (see `ops.elect_and_merge` for the sign rule).
"""

from __future__ import annotations

import threading
from typing import Literal

from pydantic import Field

from tvtool.vectors.methods.base import (
    DENSITY,
    NORMALIZE,
    SCOPE,
    Method,
    Params,
    TensorInfo,
    TermState,
    flag,
)


class TiesParams(Params):
    method: Literal["ties"] = "ties"
    density: float = Field(0.2, ge=0.0, le=1.0, description=DENSITY)
    scope: Literal["global", "tensor"] = Field(
        "global", description=SCOPE, json_schema_extra=flag("--ties-scope")
    )
    normalize: bool = Field(True, description=NORMALIZE)


def ties_combine(base, xs, weights, scale: float, normalize: bool):
    """base + scale * elect_and_merge(w_t x_t)."""
    from tvtool.vectors.methods.ops import elect_and_merge

    weighted = [x.mul_(w) if w != 1.0 else x for x, w in zip(xs, weights, strict=True)]
    return base.add_(elect_and_merge(weighted, weights, normalize), alpha=scale)


def ties_rows(x, rules, weights: list[float], normalize: bool):
    """The merged delta of one slice of the stacked task vectors x ([T, c], overwritten):
    trim every row by its rule, weight it, elect and merge (`topk.shrink_rows`, or
    `topk.trim_rows` for float64 stacks and rules that take ties in order; `ops.merge_rows`).
    `rules` items are `GlobalTopK` or `CutRule` (None: no trim)."""
    import torch

    from tvtool.vectors.methods.ops import merge_rows
    from tvtool.vectors.methods.topk import shrink_rows, trim_rows

    scratch = _scratch(x.shape, x.dtype)
    if rules is not None:
        if x.dtype == torch.float32 and not any(r.ordered for r in rules):
            shrink_rows(x, rules, scratch)
        else:
            scratch = trim_rows(x, rules)
    if any(w != 1.0 for w in weights):
        x.mul_(torch.tensor(weights, dtype=x.dtype).reshape(-1, 1))
    return merge_rows(x, [abs(w) for w in weights], normalize, scratch)


_local = threading.local()


def _scratch(shape, dtype):
    """A contiguous tensor of `shape` and `dtype` from this thread's reused buffer."""
    import torch

    n = shape[0] * shape[1]
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = _local.buf = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


class Ties(Method):
    name = "ties"
    summary = (
        "TIES: trim each vector to its top --density by |tau|, elect a sign per entry (sign of "
        "the weighted sum, 0 counts as +), merge the agreeing entries (--normalize: their "
        "weighted mean)."
    )
    Params = TiesParams

    def weighted_sum(self, p: TiesParams) -> bool:
        return False

    def whole_tensor(self, p: TiesParams) -> bool:
        return p.scope == "tensor"

    def global_density(self, p: TiesParams) -> float | None:
        return p.density if p.scope == "global" else None

    def term(self, x, t: TensorInfo, term: TermState, p: TiesParams, mask=None):
        from tvtool.vectors.methods.topk import trim

        return trim(x, p.density, term.topk if p.scope == "global" else None)

    def combine(self, base, xs, weights, scale, p: TiesParams, t: TensorInfo):
        return ties_combine(base, xs, weights, scale, p.normalize)

    def stacked(self, p: TiesParams) -> bool:
        return True

    def density(self, p: TiesParams) -> float | None:
        return p.density if p.scope == "tensor" else None

    def combine_rows(self, base, x, rules, weights, scale, p: TiesParams, t: TensorInfo):
        return base.add_(ties_rows(x, rules, weights, p.normalize), alpha=scale)


METHOD = Ties()
