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


METHOD = Sum()
