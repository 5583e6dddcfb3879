"""`sum`: task arithmetic (Ilharco et al.), theta = theta_0 + sum_t w_t tau_t."""

from __future__ import annotations

from typing import Literal

from tvtool.vectors.methods.base import Method, Params


class SumParams(Params):
    method: Literal["sum"] = "sum"


class Sum(Method):
    name = "sum"
    summary = "task arithmetic: base + sum of weighted vectors."
    Params = SumParams

    def stacked(self, p: SumParams) -> bool:
        return True  # read in stacked slices (overlapped by the reader thread)

    def combine_rows(self, base, x, rules, weights, scale, p: SumParams, t):
        for row, w in zip(x, weights, strict=True):  # term order, as the unstacked sum
            base.add_(row, alpha=w)
        return base


METHOD = Sum()
