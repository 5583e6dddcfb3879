"""`breadcrumbs`: Model Breadcrumbs (Davari & Belilovsky 2023), then task arithmetic.

Per tensor of n entries ranked by |tau| (descending; equal magnitudes: lower index first), drop
the top g = int(gamma * n) outliers and keep the next k = int(density * n) (g is lowered to
n - k when both do not fit): x = tau * [g <= rank < g + k]. Mergekit's `gamma` and `density`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tvtool.vectors.methods.base import DENSITY, Method, Params, TensorInfo, TermState


class BreadcrumbsParams(Params):
    method: Literal["breadcrumbs"] = "breadcrumbs"
    density: float = Field(0.9, ge=0.0, le=1.0, description=DENSITY)
    gamma: float = Field(
        0.01, ge=0.0, le=1.0, description="breadcrumbs: fraction of largest |tau| dropped."
    )


def breadcrumb_mask(a, density: float, gamma: float):
    """1.0 at the entries of `a` (magnitudes, flat) ranked [g, g + k) from the top, else 0."""
    from tvtool.vectors.methods.topk import topk_count, topk_weights

    n = a.numel()
    k = topk_count(n, density)
    g = min(topk_count(n, gamma), n - k)
    return topk_weights(a, g + k).sub_(topk_weights(a, g))


class Breadcrumbs(Method):
    name = "breadcrumbs"
    summary = (
        "Model Breadcrumbs: per tensor, drop the --gamma largest |tau| and keep the next "
        "--density, then sum."
    )
    Params = BreadcrumbsParams

    def whole_tensor(self, p: BreadcrumbsParams) -> bool:
        return True

    def term(self, x, t: TensorInfo, term: TermState, p: BreadcrumbsParams, mask=None):
        import torch

        keep = breadcrumb_mask(x.abs().to(torch.float32), p.density, p.gamma)
        return x.mul_(keep.to(x.dtype))


METHOD = Breadcrumbs()
