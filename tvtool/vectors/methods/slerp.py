"""`slerp`: spherical interpolation between two models, theta_0 + w_1 tau_1 and theta_0 + w_2 tau_2.

Per tensor: with v0, v1 the two models' tensors and d = <v0/|v0|, v1/|v1|>, omega = acos(d),
slerp = sin((1-t) omega)/sin(omega) v0 + sin(t omega)/sin(omega) v1; nearly parallel tensors
(|d| > 0.9995) or a zero tensor fall back to (1-t) v0 + t v1 (mergekit's rule). t = 0 gives the
first term's model. --scale multiplies the result's delta from the base (default 1.0).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from tvtool.vectors.methods.base import Method, Params, TensorInfo

DOT_THRESHOLD = 0.9995


class SlerpParams(Params):
    method: Literal["slerp"] = "slerp"
    t: float = Field(
        0.5, ge=0.0, le=1.0, description="slerp: interpolation factor (0: the first term)."
    )


def slerp(v0, v1, t: float):
    """Spherical interpolation of two flat tensors (the rule above)."""
    import torch

    n0, n1 = float(v0.norm(dtype=torch.float64)), float(v1.norm(dtype=torch.float64))
    d = float(torch.dot(v0.to(torch.float64), v1.to(torch.float64))) / (n0 * n1) if n0 * n1 else 1
    if abs(d) > DOT_THRESHOLD:
        return v0.mul(1 - t).add_(v1, alpha=t)
    omega = math.acos(max(-1.0, min(1.0, d)))
    s = math.sin(omega)
    return v0.mul(math.sin((1 - t) * omega) / s).add_(v1, alpha=math.sin(t * omega) / s)


class Slerp(Method):
    name = "slerp"
    summary = "SLERP between the two terms' models (--t, 0: the first), per tensor."
    Params = SlerpParams
    exact_terms = 2

    def weighted_sum(self, p: SlerpParams) -> bool:
        return False

    def whole_tensor(self, p: SlerpParams) -> bool:
        return True

    def combine(self, base, xs, weights, scale, p: SlerpParams, t: TensorInfo):
        v0 = xs[0].mul_(weights[0]).add_(base)
        v1 = xs[1].mul_(weights[1]).add_(base)
        out = slerp(v0, v1, p.t)
        if scale == 1.0:
            return out
        return base.add_(out.sub_(base), alpha=scale)


METHOD = Slerp()
