"""The `gain` score of `tvtool select`: per block, the best subset of its vectors under a quadratic
(empirical-Fisher) model of the loss in the block's coefficients (see `keep_gain`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tvtool.compose.objectives import Objective
from tvtool.compose.select import batch_gradients, pair_dots
from tvtool.errors import TvtoolError
from tvtool.models.bank import BankPlan
from tvtool.store.store import Store
from tvtool.vectors.blocks import BlockInfo

GAIN_RIDGE = 1e-3  # F + GAIN_RIDGE * diag(F): relative, so the gain stays invariant to tau's scale
GAIN_EXHAUSTIVE = 5000  # subsets per block searched exhaustively; above: greedy


def gain_moments(
    store: Store,
    plan: BankPlan,
    blocks: list[BlockInfo],
    clip: Any,
    objective: Objective,
    datasets: Sequence[tuple[Any, list[int], list[int], torch.Tensor]],
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [B, T], F [B, T, T]): per block b, the gradient of the loss with respect to the block's
    coefficients Lambda[:, b] at Lambda = 0 and the empirical Fisher (second moment of the
    per-sample gradients) estimated from per-batch gradients.

    The loss is the sum over data sets s of each set's mean loss (as in compose), so
    g = sum_s g_s and F = sum_s F_s (the curvature of a sum is the sum of the curvatures). For a
    set of n images in J batches (sizes m_j) with d_j = dL_j/dLambda[:, b] (L_j: batch j's mean
    loss):

        g_s = sum_j (m_j / n) d_j                         (the exact mean gradient)
        S_s = sum_j m_j (d_j - g_s)(d_j - g_s)^T / (J - 1)  (unbiased per-sample covariance: a
              batch mean of m images varies as S / m (1 - m / n), and the J batches partition
              the set)
        F_s = g_s g_s^T + S_s (n - 1) / n               (= (1/n) sum_i d_i d_i^T, the
              per-sample empirical Fisher, in expectation; exactly that when m = 1)

    so the estimate does not depend on the batch size, which only trades passes over the vectors
    (one per batch) against the noise of S. Needs J >= 2 batches per data set."""
    T, B = len(plan.vectors), len(blocks)
    sizes = [len(d[1]) for d in datasets]
    per_set: list[list[tuple[torch.Tensor, int]]] = [[] for _ in datasets]
    for grads, m, _, s in batch_gradients(clip, plan, objective, datasets, batch_size, on_batch):
        dots = pair_dots(store, plan, blocks, {p: x / m for p, x in grads.items()})
        per_set[s].append((dots.T.contiguous(), m))  # [B, T]
    g = torch.zeros(B, T, dtype=torch.float64)
    F = torch.zeros(B, T, T, dtype=torch.float64)
    for batches, n in zip(per_set, sizes, strict=True):
        if len(batches) < 2:
            raise TvtoolError(
                f"--score gain estimates the gradients' spread from batches: a data set of {n} "
                f"images needs --batch-size below {n} (two batches or more)"
            )
        gs = sum(d * (m / n) for d, m in batches)
        spread = sum(m * torch.einsum("bt,bu->btu", d - gs, d - gs) for d, m in batches)
        F += torch.einsum("bt,bu->btu", gs, gs) + spread / (len(batches) - 1) * (n - 1) / n
        g += gs
    return g, F


def subset_gain(g: torch.Tensor, F: torch.Tensor, subset: Sequence[int], ridge: float) -> float:
    """g_S^T (F_SS + ridge diag(F_SS))^-1 g_S / 2 for one block (g [T], F [T, T])."""
    idx = torch.tensor(list(subset), dtype=torch.long)
    if idx.numel() == 0:
        return 0.0
    gs, fs = g[idx], F[idx][:, idx]
    fs = fs + ridge * torch.diag(fs.diagonal())
    return float(gs @ torch.linalg.solve(fs, gs)) / 2


def _greedy(
    g: torch.Tensor, F: torch.Tensor, cand: list[int], first: int, k: int, ridge: float
) -> list[int]:
    """From {first}, add the candidate that raises subset_gain most, until k vectors."""
    chosen = [first]
    while len(chosen) < k:
        gains = {t: subset_gain(g, F, [*chosen, t], ridge) for t in cand if t not in chosen}
        chosen.append(max(gains, key=lambda t: (gains[t], -t)))
    return sorted(chosen)


def keep_gain(
    g: torch.Tensor,
    F: torch.Tensor,
    covered: torch.Tensor,
    top: int,
    ridge: float = GAIN_RIDGE,
    exhaustive: int = GAIN_EXHAUSTIVE,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Per block, the subset S of at most `top` covering vectors with the largest predicted loss
    decrease gain(S) = g_S^T F_SS^-1 g_S / 2; returns (scores [T, B], kept pairs).

    Why: near Lambda = 0 the loss of a block's coefficients is L0 + g^T l + l^T H l / 2, with the
    Gauss-Newton curvature H approximated by the empirical Fisher F (`gain_moments`). Learning
    only the coefficients in S, the best step l_S = -F_SS^-1 g_S lowers the loss by gain(S).
    Rescaling tau_t by c rescales g_t by c and row and column t of F by c, which leaves gain(S)
    unchanged (the ridge is relative to diag(F) for that reason): a vector does not win by its
    size. Two vectors whose gradients move together (redundant directions) gain little more than
    one, so the subset keeps complementary vectors, which scoring vectors one by one cannot.
    Since F >= g g^T (Jensen), 0 <= gain <= 1/2.

    The search is exhaustive when a block has at most `exhaustive` subsets of size `top` (C(6, 3)
    = 20), else greedy: from each vector, add the one that raises the gain most until `top`.
    scores[t, b] is the largest gain of a searched subset holding t (0 for vectors that do not
    cover b or are zero there), so the kept vectors score highest in their block."""
    from itertools import combinations

    if top < 1:
        raise TvtoolError("--top must be >= 1")
    B, T = g.shape
    scores = torch.zeros(T, B, dtype=torch.float64)
    keep: list[tuple[int, int]] = []
    for b in range(B):
        cand = [t for t in range(T) if covered[t, b] and float(F[b, t, t]) > 0]
        k = min(top, len(cand))
        if k == 0:
            continue
        if math.comb(len(cand), k) <= exhaustive:
            subsets = [list(c) for c in combinations(cand, k)]
        else:
            subsets = [_greedy(g[b], F[b], cand, first, k, ridge) for first in cand]
        best, best_gain = None, -1.0
        for sub in subsets:
            v = subset_gain(g[b], F[b], sub, ridge)
            for t in sub:
                scores[t, b] = max(float(scores[t, b]), v)
            if v > best_gain:
                best, best_gain = sub, v
        keep += [(t, b) for t in best]  # type: ignore[union-attr]
    return scores, sorted(keep, key=lambda p: (p[1], p[0]))
