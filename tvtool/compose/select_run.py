"""`select` end to end: score (vector, block) pairs or elements and store a `selection` or masks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tvtool.compose.ddp import Dist
from tvtool.compose.objectives import get_objective
from tvtool.compose.prepare import data_specs, prepare_data
from tvtool.compose.registry import SCORES, threshold_of
from tvtool.compose.reports import (
    DataInfo,
    MaskInfo,
    MasksReport,
    SelectionReport,
    SelectReport,
    VectorRef,
)
from tvtool.compose.requests import SelectRequest
from tvtool.compose.select import (
    SelectionDoc,
    base_gradient,
    element_masks,
    fisher_scores,
    fisher_unit_scores,
    grad_scores,
    keep_budget,
    keep_top,
    norm_scores,
    pair_bytes,
)
from tvtool.compose.select_gain import gain_moments, keep_gain
from tvtool.errors import TvtoolError
from tvtool.models.bank import BankPlan, plan_bank, plan_from_vectors
from tvtool.store.store import Store, check_ref_name
from tvtool.vectors.blocks import layer_of, make_blocks
from tvtool.vectors.stored import save_tensor_object

ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
DEFAULT_DENSITY = 0.2


def run_select(
    opts: SelectRequest,
    clip: Any | None = None,
    on_batch: Callable[[], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> SelectReport:
    """Score and keep as `opts` says; store the selection or masks; returns the report. `clip`:
    the model `opts.model` names, when the caller has loaded it already."""
    from tvtool.models.functional import visual_params

    store = Store(opts.store)
    kind = opts.kind
    needs_data = SCORES[opts.score].needs_data
    if clip is None and opts.model.given:
        clip = opts.model.load(warn=warn)
    if clip is not None:
        plan = plan_bank(
            store,
            opts.vectors,
            visual_params(clip),
            set(clip.model.state_dict()),
            clip.base_fingerprint,
            opts.allow_other_base,
            warn,
        )
    else:
        plan = plan_from_vectors(store, opts.vectors)
    grads, data_info, scorer = None, [], None
    if needs_data:
        objective = get_objective(opts.objective.name)
        specs = data_specs(list(opts.data), classnames=opts.classnames, heads=opts.heads)
        sets = []
        for spec in specs:
            t = prepare_data(
                clip,
                spec,
                objective,
                shots=opts.shots,
                val_split=None,
                seed=opts.seed,
                templates=opts.templates,
                store=store,
                threshold=threshold_of(opts.objective),  # type: ignore[arg-type]
                batch_size=opts.batch_size,
                dist=Dist(),
                split=opts.split,
            )
            sets.append((t.folder, t.train_idx, t.labels, t.head))
            data_info.append(DataInfo(name=t.name, **t.info))
        if opts.score in ("fisher", "fisher-unit", "gain"):  # per batch once blocks are known

            def scorer(blocks, covered):
                """(scores [T, B], kept pairs or None: the top scores)."""
                args = (store, plan, blocks, clip, objective, sets, opts.batch_size, on_batch)
                if opts.score == "gain":
                    g, F = gain_moments(*args)
                    # --budget-mb: pairs ranked by the gain of each vector alone
                    scores, keep = keep_gain(g, F, covered, opts.top or 1)
                    return scores, keep if opts.top is not None else None
                s = fisher_scores(*args)
                if opts.score == "fisher-unit":
                    s = fisher_unit_scores(s, norm_scores(store, plan, blocks))
                return s, None
        else:
            grads = base_gradient(clip, plan, objective, sets, opts.batch_size, on_batch)
    common: dict[str, Any] = {
        "score": opts.score,
        "vectors": [VectorRef(digest=v.digest, label=v.label) for v in plan.vectors],
        "data": data_info,
        "shots": opts.shots,
        "seed": opts.seed,
        "base_fingerprint": clip.base_fingerprint if clip is not None else None,
        "objective": opts.objective.name if needs_data else None,
    }
    if kind == "mask":
        return MasksReport(kind="mask", **common, **_masks(store, plan, opts, grads, common, warn))
    return SelectionReport(
        kind="selection", **common, **_selection(store, plan, opts, grads, common, scorer)
    )


def _selection(
    store: Store,
    plan: BankPlan,
    opts: SelectRequest,
    grads,
    common: dict[str, Any],
    scorer: Callable | None = None,
) -> dict[str, Any]:
    try:
        blocks = make_blocks(plan.shapes(), opts.granularity)  # type: ignore[arg-type]
    except ValueError as e:
        raise TvtoolError(str(e)) from None
    nbytes = pair_bytes(plan, blocks, ELEMENT_SIZE[opts.vector_dtype])
    covered = nbytes > 0
    keep = None
    if scorer is not None:
        scores, keep = scorer(blocks, covered)
    elif grads is not None:
        scores = grad_scores(store, plan, blocks, grads)
    else:
        scores = norm_scores(store, plan, blocks)
    if keep is None and opts.top is not None:
        keep = keep_top(scores, covered, opts.top)
    elif keep is None:
        keep = keep_budget(scores, covered, nbytes, int(opts.budget_mb * 1e6))  # type: ignore[operator]
    kept_bytes = sum(int(nbytes[p]) for p in keep)
    doc = SelectionDoc(
        vectors=plan.digests,
        blocks=blocks,
        keep=keep,
        scores=scores.tolist(),
        score=opts.score,
        granularity=opts.granularity,
    )
    params = _recorded(common, "score")
    params.update(
        top=opts.top,
        budget_mb=opts.budget_mb,
        granularity=opts.granularity,
        kept=len(keep),
        pairs=int(covered.sum()),
        bytes=kept_bytes,
        total_bytes=int(nbytes.sum()),
        vector_dtype=opts.vector_dtype,
    )
    manifest = store.put_json(
        doc.model_dump(mode="json"), kind="selection", inputs=plan.digests, params=params
    )
    if opts.name:
        store.set_ref(opts.name, manifest.digest, force=opts.force)
    return {
        "digest": manifest.digest,
        "name": opts.name,
        "granularity": opts.granularity,
        "blocks": [b.name for b in blocks],
        "scores": scores.tolist(),
        "keep": keep,
        "bytes": kept_bytes,
        "total_bytes": int(nbytes.sum()),
        "top": opts.top,
        "budget_mb": opts.budget_mb,
    }


def _masks(
    store: Store, plan: BankPlan, opts: SelectRequest, grads, common: dict[str, Any], warn
) -> dict[str, Any]:
    density = DEFAULT_DENSITY if opts.density is None else opts.density
    out = []
    for t, v in enumerate(plan.vectors):
        masks, kept, scored = element_masks(store, plan, t, density, grads)
        if grads is not None and v.ignored and warn:
            warn(
                f"{v.label}: {v.ignored} tensor(s) outside the image tower have no importance; "
                "masked out"
            )
        name = None
        if opts.name:
            name = opts.name if len(plan.vectors) == 1 else f"{opts.name}/{v.label}"
            check_ref_name(name)
        params = {
            "vector": v.digest,
            "density": density,
            "score": opts.score,
            "kept": kept,
            "scored": scored,
            **_recorded(common),
        }
        manifest = save_tensor_object(store, "mask", masks, inputs=[v.digest], params=params)
        if name:
            store.set_ref(name, manifest.digest, force=opts.force)
        out.append(
            MaskInfo(
                vector=v.digest,
                label=v.label,
                digest=manifest.digest,
                name=name,
                kept=kept,
                scored=scored,
                kept_by_layer=_kept_by_layer(masks),
            )
        )
    return {"density": density, "masks": out}


def _recorded(common: dict[str, Any], *extra: str) -> dict[str, Any]:
    """What a stored selection or mask records of the run (its manifest's params; JSON)."""
    keys = (*extra, "data", "shots", "seed", "base_fingerprint", "objective")
    data = [d.model_dump(mode="json", exclude_unset=True) for d in common["data"]]
    return {k: data if k == "data" else common[k] for k in keys}


def _kept_by_layer(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of each layer's elements (keys grouped like --granularity layer) a mask keeps."""
    kept: dict[str, list[int]] = {}
    for k, m in masks.items():
        acc = kept.setdefault(layer_of(k), [0, 0])
        acc[0] += int(m.sum())
        acc[1] += m.numel()
    return {layer: a / n for layer, (a, n) in kept.items()}
