"""`select` end to end: score (vector, block) pairs or elements and store a `selection` or masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tvtool.compose.ddp import Dist
from tvtool.compose.objectives import get_objective
from tvtool.compose.select import (
    SelectionDoc,
    base_gradient,
    element_masks,
    grad_scores,
    keep_budget,
    keep_top,
    norm_scores,
    pair_bytes,
)
from tvtool.datasets.prepare import DataSpec, prepare_data
from tvtool.errors import TvtoolError
from tvtool.models.bank import BankPlan, plan_bank, plan_from_vectors
from tvtool.store.store import Store, check_ref_name
from tvtool.vectors.blocks import layer_of, make_blocks
from tvtool.vectors.stored import save_tensor_object

SCORES = ("grad", "importance", "norm")
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
DEFAULT_DENSITY = 0.2


@dataclass
class SelectOptions:
    vectors: list[str]
    data: list[DataSpec] = field(default_factory=list)
    score: str = "grad"
    top: int | None = None
    budget_mb: float | None = None
    density: float | None = None
    granularity: str = "tensor"
    objective: str = "ce"
    shots: int | None = None
    seed: int = 0
    threshold: float = 0.99
    batch_size: int = 32
    vector_dtype: str = "fp16"
    templates: list[str] | None = None
    split: str = "train"
    allow_other_base: bool = False
    name: str | None = None
    force: bool = False


def output_kind(opts: SelectOptions) -> str:
    """'selection' (pairs) or 'mask' (elements), checking the options make sense together."""
    if opts.score not in SCORES:
        raise TvtoolError(f"unknown --score {opts.score!r}: choose from {', '.join(SCORES)}")
    pairs = opts.top is not None or opts.budget_mb is not None
    if opts.top is not None and opts.budget_mb is not None:
        raise TvtoolError("give --top N or --budget-mb M, not both")
    if opts.score == "importance" or (opts.score == "norm" and opts.density is not None):
        if pairs:
            raise TvtoolError(
                f"--score {opts.score} with --density writes masks: --top/--budget-mb do not apply"
            )
        return "mask"
    if opts.density is not None:
        raise TvtoolError(
            "--density applies to masks (--score importance, or norm without --top/--budget-mb)"
        )
    if not pairs:
        raise TvtoolError(
            f"--score {opts.score} keeps (vector, block) pairs: give --top N or --budget-mb M "
            "(or --density d for masks with --score norm)"
        )
    return "selection"


def run_select(
    store: Store,
    clip: Any | None,
    opts: SelectOptions,
    on_batch: Callable[[], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from tvtool.models.functional import visual_params

    if opts.name is not None:
        check_ref_name(opts.name)
    kind = output_kind(opts)
    needs_data = opts.score != "norm"
    if needs_data and (clip is None or not opts.data):
        raise TvtoolError(f"--score {opts.score} needs the model (--model/--base) and --data DIR")
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
    grads, data_info = None, []
    if needs_data:
        objective = get_objective(opts.objective)
        sets = []
        for spec in opts.data:
            t = prepare_data(
                clip,
                spec,
                objective,
                shots=opts.shots,
                val_split=None,
                seed=opts.seed,
                templates=opts.templates,
                store=store,
                threshold=opts.threshold,
                batch_size=opts.batch_size,
                dist=Dist(),
                split=opts.split,
            )
            sets.append((t.folder, t.train_idx, t.labels, t.head))
            data_info.append({"name": t.name, **t.info})
        grads = base_gradient(clip, plan, objective, sets, opts.batch_size, on_batch)
    report: dict[str, Any] = {
        "kind": kind,
        "score": opts.score,
        "vectors": [{"digest": v.digest, "label": v.label} for v in plan.vectors],
        "data": data_info,
        "shots": opts.shots,
        "seed": opts.seed,
        "base_fingerprint": clip.base_fingerprint if clip is not None else None,
        "objective": opts.objective if needs_data else None,
    }
    if kind == "mask":
        report.update(_masks(store, plan, opts, grads, report, warn))
    else:
        report.update(_selection(store, plan, opts, grads, report))
    return report


def _selection(
    store: Store, plan: BankPlan, opts: SelectOptions, grads, common: dict[str, Any]
) -> dict[str, Any]:
    try:
        blocks = make_blocks(plan.shapes(), opts.granularity)  # type: ignore[arg-type]
    except ValueError as e:
        raise TvtoolError(str(e)) from None
    if grads is not None:
        scores = grad_scores(store, plan, blocks, grads)
    else:
        scores = norm_scores(store, plan, blocks)
    if opts.vector_dtype not in ELEMENT_SIZE:
        raise TvtoolError(f"unknown --vector-dtype {opts.vector_dtype!r}: use fp32, fp16 or bf16")
    nbytes = pair_bytes(plan, blocks, ELEMENT_SIZE[opts.vector_dtype])
    covered = nbytes > 0
    if opts.top is not None:
        keep = keep_top(scores, covered, opts.top)
    else:
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
    params = {
        k: common[k] for k in ("score", "data", "shots", "seed", "base_fingerprint", "objective")
    }
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
    store: Store, plan: BankPlan, opts: SelectOptions, grads, common: dict[str, Any], warn
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
            **{k: common[k] for k in ("data", "shots", "seed", "base_fingerprint", "objective")},
        }
        manifest = save_tensor_object(store, "mask", masks, inputs=[v.digest], params=params)
        if name:
            store.set_ref(name, manifest.digest, force=opts.force)
        out.append(
            {
                "vector": v.digest,
                "label": v.label,
                "digest": manifest.digest,
                "name": name,
                "kept": kept,
                "scored": scored,
                "kept_by_layer": _kept_by_layer(masks),
            }
        )
    return {"density": density, "masks": out}


def _kept_by_layer(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of each layer's elements (keys grouped like --granularity layer) a mask keeps."""
    kept: dict[str, list[int]] = {}
    for k, m in masks.items():
        acc = kept.setdefault(layer_of(k), [0, 0])
        acc[0] += int(m.sum())
        acc[1] += m.numel()
    return {layer: a / n for layer, (a, n) in kept.items()}
