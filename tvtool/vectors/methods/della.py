"""`della`: DELLA-Merging (Deep et al. 2024): magnitude-ranked drops (MagPrune), rescale, TIES.

Per row of a tensor (a 2-D weight's rows; one row for a vector; [d0, -1] for more dims), the n
entries are ranked by |tau| ascending (r = 0 .. n-1; equal magnitudes: lower index first) and
kept with probability q_r = density - epsilon + 2 epsilon r / (n - 1) (density for n = 1);
entry i survives when u_i < q_i (u from the term's seeded stream) and is rescaled by 1/q_i.
The dropped vectors then go through TIES' sign election and disjoint merge (mergekit's `della`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tvtool.vectors.methods.base import (
    DENSITY,
    NORMALIZE,
    SEED,
    Method,
    Params,
    TensorInfo,
    TermState,
)


class DellaParams(Params):
    method: Literal["della"] = "della"
    density: float = Field(0.5, ge=0.0, le=1.0, description=DENSITY)
    epsilon: float = Field(
        0.1, ge=0.0, le=0.5, description="della: keep probabilities span density +- epsilon."
    )
    normalize: bool = Field(True, description=NORMALIZE)
    seed: int = Field(0, description=SEED)

    @model_validator(mode="after")
    def _probabilities(self) -> DellaParams:
        if self.density - self.epsilon <= 0 or self.density + self.epsilon > 1:
            raise ValueError("della needs 0 < density - epsilon and density + epsilon <= 1")
        return self


def keep_probabilities(x, shape: tuple[int, ...], density: float, epsilon: float):
    """q for every entry of flat `x`, by its magnitude rank within its row."""
    import torch

    rows = shape[0] if len(shape) >= 2 else 1
    a = x.abs().reshape(rows, -1)
    n = a.shape[1]
    if n == 1:
        return torch.full_like(x, density)
    order = torch.sort(a, dim=1, stable=True).indices  # ascending; ties: lower index first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand(rows, n).contiguous())
    q = ranks.to(x.dtype).mul_(2 * epsilon / (n - 1)).add_(density - epsilon)
    return q.reshape(-1)


class Della(Method):
    name = "della"
    summary = (
        "DELLA: drop entries with probabilities ranked by |tau| per row (--density +- "
        "--epsilon), rescale by 1/q, then TIES' sign election and merge."
    )
    Params = DellaParams
    random = True

    def weighted_sum(self, p: DellaParams) -> bool:
        return False

    def whole_tensor(self, p: DellaParams) -> bool:
        return True

    def term(self, x, t: TensorInfo, term: TermState, p: DellaParams, mask=None):
        from tvtool.vectors.methods.ops import dare_seed, uniform

        q = keep_probabilities(x, t.shape, p.density, p.epsilon)
        keep = uniform(x, dare_seed(p.seed, term.vector, t.key)).to(x.dtype).lt_(q)
        return x.div_(q).mul_(keep)

    def combine(self, base, xs, weights, scale, p: DellaParams, t: TensorInfo):
        from tvtool.vectors.methods.ties import ties_combine

        return ties_combine(base, xs, weights, scale, p.normalize)


METHOD = Della()
