"""Which (vector, block) pairs and which elements matter: scores for `tvtool select`.

One pass over the data gives the mean loss gradient at the base weights, G_k = dL/dtheta_k for
every image-tower parameter k a vector covers. Everything else is read off G while the vectors are
streamed from the store one tensor at a time (none is put on the device):

* grad:       s[t, b] = |dL/dLambda[t, b]| at Lambda = 0 = |sum_{k in b} <G_k, tau_t,k>|
              (the chain rule through theta_k = theta_0,k + Lambda[t, b] tau_t,k);
* fisher:     s[t, b] = sum_j (dL_j/dLambda[t, b])^2 over batches j (the empirical Fisher
              diagonal of the coefficients): batches that disagree in sign do not cancel;
* fisher-unit: s[t, b] = fisher / ||tau_t,b||^2 = sum_j <G_j,b, tau_t,b / ||tau_t,b||>^2, the
              empirical Fisher along the unit direction of tau_t,b: scale-free, so a large vector
              does not win every block by its size alone (Lambda absorbs any scale);
* gain:       the loss decrease a quadratic (empirical-Fisher) model of each block predicts
              for the best step on a subset S of its vectors, g_S^T F_SS^-1 g_S / 2: the best
              subset of --top vectors per block, not the top vectors one by one (see
              `tvtool.compose.select_gain`); invariant to the vectors' norms, and a vector
              redundant with one already kept adds little;
* importance: I_t = |tau_t ⊙ G| element-wise (first-order Taylor estimate of the loss change
              when tau_t's element is dropped), top `density` of each vector kept as a mask;
* norm:       data-free, s[t, b] = ||tau_t,b||_2 for selections, |tau_t| for masks.

A `selection` keeps the top-N vectors of every block (`--top`) or the best pairs whose device bytes
fit a budget (`--budget-mb`); compose then loads and learns only those pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from tvtool.compose.objectives import Objective
from tvtool.datasets import images as mdata
from tvtool.errors import TvtoolError
from tvtool.models.bank import BankPlan
from tvtool.models.functional import autocast, encode_images, visual_params
from tvtool.store.store import Store
from tvtool.vectors.blocks import BlockInfo
from tvtool.vectors.stored import open_tensor_object


class SelectionDoc(BaseModel):
    """The JSON body of a `selection` object."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[str]
    blocks: list[BlockInfo]
    keep: list[tuple[int, int]]  # (vector row, block index)
    scores: list[list[float]]  # [T][B]
    score: str
    granularity: str = "tensor"


def load_selection(store: Store, ref: str) -> tuple[str, SelectionDoc]:
    digest = store.resolve(ref, kind="selection")
    try:
        return digest, SelectionDoc.model_validate(store.read_json(digest))
    except ValueError as e:
        raise TvtoolError(f"selection {ref!r} is malformed: {str(e).splitlines()[0]}") from None


def selection_keep(doc: SelectionDoc, plan: BankPlan) -> Callable[[int, str], bool]:
    """keep(t, key) for the bank's rows: is (vector t, the selection block holding key) kept?"""
    row = {d: i for i, d in enumerate(doc.vectors)}
    missing = [v.label for v in plan.vectors if v.digest not in row]
    if missing:
        raise TvtoolError(f"vector(s) not in the selection: {', '.join(missing)}")
    block_of = {k: b for b, blk in enumerate(doc.blocks) for k in blk.keys}
    kept = {(int(t), int(b)) for t, b in doc.keep}
    rows = [row[v.digest] for v in plan.vectors]

    def keep(t: int, key: str) -> bool:
        b = block_of.get(key)
        return b is not None and (rows[t], b) in kept

    return keep


# -- the gradient at the base -------------------------------------------------------------------
def batch_gradients(
    clip: Any,
    plan: BankPlan,
    objective: Objective,
    datasets: Sequence[tuple[Any, list[int], list[int], torch.Tensor]],
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], int, int, int]]:
    """Per batch: (d sum-of-losses / dtheta per covered param, batch size, its data set's size,
    its data set's index), at the base weights, eval preprocessing. `datasets`: (folder,
    indices, targets, head)."""
    tower = visual_params(clip)
    params = {k.param: tower[k.param].detach().clone().requires_grad_(True) for k in plan.keys}
    tf = mdata.eval_transform(clip)
    scale = clip.logit_scale
    for i, (folder, indices, targets, head) in enumerate(datasets):
        n = len(indices)
        for s in range(0, n, batch_size):
            images, _ = mdata.load_tensors(folder, indices[s : s + batch_size], tf)
            labels = torch.tensor(targets[s : s + batch_size], dtype=torch.long, device=clip.device)
            with autocast(clip.device):
                feats = encode_images(clip, params, images.to(clip.device))
            loss = objective.loss(scale * feats.float() @ head.T, labels).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            yield {p: g.float() for p, g in zip(params, grads, strict=True)}, len(labels), n, i
            if on_batch:
                on_batch()


def base_gradient(
    clip: Any,
    plan: BankPlan,
    objective: Objective,
    datasets: Sequence[tuple[Any, list[int], list[int], torch.Tensor]],
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean gradient of the objective over all images (eval preprocessing), per covered param;
    each data set's loss is its mean, the sets' losses are summed."""
    total: dict[str, torch.Tensor] = {}
    for grads, _, n, _ in batch_gradients(clip, plan, objective, datasets, batch_size, on_batch):
        for p, g in grads.items():
            total[p] = total[p].add_(g / n) if p in total else g / n
    return total


def fisher_scores(
    store: Store,
    plan: BankPlan,
    blocks: list[BlockInfo],
    clip: Any,
    objective: Objective,
    datasets: Sequence[tuple[Any, list[int], list[int], torch.Tensor]],
    batch_size: int,
    on_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """[T, B] sum over batches j of (dL_j/dLambda[t, b])^2 at Lambda = 0, L_j the mean loss of
    batch j: the diagonal of the empirical Fisher information of the coefficients, estimated per
    batch. Unlike `grad` (the magnitude of the *mean* gradient), gradients of batches that pull
    a coefficient in opposite directions do not cancel, so a vector that matters to part of the
    data keeps its score. Costs one pass over the vectors per batch (larger batches: fewer)."""
    out = torch.zeros(len(plan.vectors), len(blocks), dtype=torch.float64)
    for grads, m, _, _ in batch_gradients(clip, plan, objective, datasets, batch_size, on_batch):
        out += pair_dots(store, plan, blocks, {p: g / m for p, g in grads.items()}).pow(2)
    return out


def fisher_unit_scores(fisher: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """[T, B] fisher[t, b] / ||tau_t,b||^2 (0 where tau_t,b = 0): the expected squared
    directional derivative of the batch loss along the unit vector u = tau_t,b / ||tau_t,b||,
    sum_j <dL_j/dtheta_b, u>^2.

    Why: theta_b = theta_0,b + Lambda[t, b] tau_t,b, so dL_j/dLambda = <G_j,b, tau_t,b> grows
    with ||tau_t,b|| and `fisher` grows with its square. A learned coefficient absorbs any scale
    (c tau with Lambda / c is the same model), so the size of tau says nothing about whether its
    direction helps; `fisher` alone keeps the largest vectors in most blocks. Per unit norm, the
    score is the loss's sensitivity to the direction: with curvature c I along it, the loss
    decrease of the best step on Lambda[t, b] alone is <G, u>^2 / (2 c), the same for every
    vector's scale (one batch; summed over batches, the Fisher form)."""
    sq = norms.pow(2)
    return torch.where(sq > 0, fisher / sq.clamp_min(1e-300), torch.zeros_like(fisher))


def _vector_tensors(store: Store, plan: BankPlan, t: int):
    """(key, param or None, tau as fp32 on the gradient's device) of vector t, one at a time."""
    _, reader = open_tensor_object(store, plan.vectors[t].digest, "vector")
    param = {k.key: k.param for k in plan.keys}
    with reader:
        for key in reader.keys():
            yield key, param.get(key), reader.get(key)


def grad_scores(
    store: Store, plan: BankPlan, blocks: list[BlockInfo], grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """[T, B] |dL/dLambda[t, b]| at Lambda = 0."""
    return pair_dots(store, plan, blocks, grads).abs()


def pair_dots(
    store: Store, plan: BankPlan, blocks: list[BlockInfo], grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """[T, B] sum_{k in b} <G_k, tau_t,k> (= dL/dLambda[t, b] when G = dL/dtheta)."""
    block_of = {k: b for b, blk in enumerate(blocks) for k in blk.keys}
    out = torch.zeros(len(plan.vectors), len(blocks), dtype=torch.float64)
    for t in range(len(plan.vectors)):
        for key, param, tau in _vector_tensors(store, plan, t):
            if param is not None:
                g = grads[param]
                out[t, block_of[key]] += float((g.double() * tau.to(g.device, torch.float64)).sum())
    return out


def norm_scores(store: Store, plan: BankPlan, blocks: list[BlockInfo]) -> torch.Tensor:
    """[T, B] L2 norm of each vector's part in each block (data-free), in one streamed pass
    over the keys with the next key read in the background (vectors.gram)."""
    from tvtool.vectors.gram import range_reader, stream_keys

    block_of = {k: b for b, blk in enumerate(blocks) for k in blk.keys}
    rows_of = {k.key: k.rows for k in plan.keys}
    out = torch.zeros(len(plan.vectors), len(blocks), dtype=torch.float64)
    readers = []
    try:
        for v in plan.vectors:
            readers.append(open_tensor_object(store, v.digest, "vector")[1])
        stream = stream_keys(
            [k.key for k in plan.keys],
            lambda key: rows_of[key],
            lambda t, key: readers[t].get(key),
            lambda t, key: tuple(readers[t].meta(key).shape),
            [v.label for v in plan.vectors],
            ranged=lambda t, key: range_reader(readers[t], key),
            signs=False,
        )
        for rows in stream:
            sq = rows.sums.gram.diagonal()
            for r, t in enumerate(rows.holders):
                out[t, block_of[rows.key]] += float(sq[r])
    finally:
        for reader in readers:
            reader.close()
    return out.sqrt()


def pair_bytes(plan: BankPlan, blocks: list[BlockInfo], element_size: int) -> torch.Tensor:
    """[T, B] device bytes of each (vector, block) pair."""
    numel = {k.key: math.prod(k.shape) for k in plan.keys}
    rows = {k.key: set(k.rows) for k in plan.keys}
    out = torch.zeros(len(plan.vectors), len(blocks), dtype=torch.int64)
    for b, blk in enumerate(blocks):
        for key in blk.keys:
            for t in rows.get(key, ()):
                out[t, b] += numel[key] * element_size
    return out


def keep_top(scores: torch.Tensor, covered: torch.Tensor, top: int) -> list[tuple[int, int]]:
    """The `top` best-scoring covering vectors of every block."""
    if top < 1:
        raise TvtoolError("--top must be >= 1")
    keep = []
    for b in range(scores.shape[1]):
        cand = [t for t in range(scores.shape[0]) if covered[t, b]]
        cand.sort(key=lambda t: (-float(scores[t, b]), t))
        keep += [(t, b) for t in cand[:top]]
    return sorted(keep, key=lambda p: (p[1], p[0]))


def keep_budget(
    scores: torch.Tensor, covered: torch.Tensor, nbytes: torch.Tensor, budget: int
) -> list[tuple[int, int]]:
    """Best pairs first (greedy by score) while their bytes fit `budget`."""
    pairs = [
        (t, b) for t in range(scores.shape[0]) for b in range(scores.shape[1]) if covered[t, b]
    ]
    pairs.sort(key=lambda p: (-float(scores[p]), p))
    keep, used = [], 0
    for p in pairs:
        if used + int(nbytes[p]) <= budget:
            keep.append(p)
            used += int(nbytes[p])
    if not keep:
        smallest = min(int(nbytes[p]) for p in pairs) if pairs else 0
        raise TvtoolError(
            f"--budget-mb is too small: the smallest pair needs {smallest / 1e6:.3f} MB"
        )
    return sorted(keep, key=lambda p: (p[1], p[0]))


# -- element masks ------------------------------------------------------------------------------
def element_masks(
    store: Store,
    plan: BankPlan,
    t: int,
    density: float,
    grads: dict[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Masks (bool, keyed like vector t) keeping its top `density` elements by |tau ⊙ G| (or by
    |tau| when `grads` is None). With gradients, tensors outside the image tower score 0 and are
    dropped; `density` counts the scored elements only. Returns (masks, kept, scored)."""
    if not 0.0 < density <= 1.0:
        raise TvtoolError(f"--density must be in (0, 1] (got {density})")
    scores: dict[str, torch.Tensor] = {}
    shapes: dict[str, torch.Size] = {}
    for key, param, tau in _vector_tensors(store, plan, t):
        shapes[key] = tau.shape
        if grads is None:
            scores[key] = tau.float().abs().flatten()
        elif param is not None:
            scores[key] = (tau.float() * grads[param].float().cpu()).abs().flatten()
    flat = torch.cat(list(scores.values())) if scores else torch.zeros(0)
    k = min(flat.numel(), max(1, int(density * flat.numel() + 0.5)))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, off = {}, 0
    for key, shape in shapes.items():
        if key in scores:
            n = scores[key].numel()
            masks[key] = chosen[off : off + n].view(shape).clone()
            off += n
        else:
            masks[key] = torch.zeros(shape, dtype=torch.bool)
    return masks, k, flat.numel()
