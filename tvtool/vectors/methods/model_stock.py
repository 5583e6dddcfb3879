"""`model_stock`: Model Stock (Jang et al. 2024): interpolate towards the fine-tunes' average.

Per tensor (or per row with --filter-wise), with k >= 2 weighted task vectors x_t = w_t tau_t:
cos = the mean pairwise cosine of the x_t (0 for a zero vector, clamped to [0, 1]),
t = k cos / (1 + (k - 1) cos), and theta = theta_0 + scale * t * mean_t(x_t), i.e. the paper's
t * w_avg + (1 - t) * w_0 relative to the base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tvtool.vectors.methods.base import Method, Params, TensorInfo


class ModelStockParams(Params):
    method: Literal["model_stock"] = "model_stock"
    filter_wise: bool = Field(
        False, description="model_stock: one ratio per row instead of per tensor."
    )


def interpolation_ratio(xs, rows: int):
    """t per row: k cos / (1 + (k - 1) cos) with cos the mean pairwise cosine."""
    import torch

    k = len(xs)
    v = [x.reshape(rows, -1).to(torch.float64) for x in xs]
    norms = [x.norm(dim=1) for x in v]
    total = torch.zeros(rows, dtype=torch.float64)
    for i in range(k):
        for j in range(i + 1, k):
            den = norms[i] * norms[j]
            cos = (v[i] * v[j]).sum(1) / torch.where(den > 0, den, 1.0)
            total += torch.where(den > 0, cos, 0.0)
    cos = (total / (k * (k - 1) / 2)).clamp(0.0, 1.0)
    return k * cos / (1 + (k - 1) * cos)


class ModelStock(Method):
    name = "model_stock"
    summary = (
        "Model Stock: per tensor, base + t * mean of the vectors, t = k cos / (1 + (k-1) cos) "
        "from their mean pairwise cosine (--filter-wise: per row)."
    )
    Params = ModelStockParams
    min_terms = 2

    def weighted_sum(self, p: ModelStockParams) -> bool:
        return False

    def whole_tensor(self, p: ModelStockParams) -> bool:
        return True

    def combine(self, base, xs, weights, scale, p: ModelStockParams, t: TensorInfo):
        rows = t.shape[0] if p.filter_wise and len(t.shape) >= 2 else 1
        ratio = interpolation_ratio([x.mul_(w) for x, w in zip(xs, weights, strict=True)], rows)
        mean = xs[0].clone()
        for x in xs[1:]:
            mean += x
        mean = mean.reshape(rows, -1).mul_(ratio.to(mean.dtype).unsqueeze(1) / len(xs))
        return base.add_(mean.reshape(-1), alpha=scale)


METHOD = ModelStock()
