"""`compose` end to end: vectors + model + data -> learned coefficients -> a `coefs` object.

The run directory (checkpoints for --resume) is `<store>/tmp/compose-runs/<hash>` where the hash
covers everything that determines the result (vectors, base, data, objective, hyper-parameters,
selection); it is removed once the coefs object is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from tvtool.compose.coefs import Coefs, attach_layout, build_layout, learnable_mask
from tvtool.compose.ddp import Dist
from tvtool.compose.objectives import get_objective
from tvtool.compose.prepare import data_specs, prepare_data
from tvtool.compose.recipes import Recipe, recipe_for
from tvtool.compose.registry import threshold_of
from tvtool.compose.reports import ComposeReport, ComposeSettings, VectorRef
from tvtool.compose.requests import ComposeRequest
from tvtool.compose.select import load_selection, selection_keep
from tvtool.compose.train import Reporter, Settings, Trainer
from tvtool.errors import TvtoolError
from tvtool.models.bank import load_stacks, plan_bank, stored_bytes
from tvtool.store.store import Store
from tvtool.vectors.stored import save_tensor_object

_REPORTED = ("objective", "shots", "seed", "lr", "epoch", "select_by", "val_acc", "base_val_acc",
             "history", "data", "selection", "world_size")  # the report's fields from `params`
MIN_STEPS = 50  # fewer optimisation steps than this rarely move Lambda far from 0
VECTOR_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vector_dtype(spec: str, device: torch.device, stored: list[str]) -> torch.dtype:
    """auto: fp32 on CPU; on CUDA bf16 when every vector is stored in bf16, else fp16."""
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if stored and all(s == "BF16" for s in stored) else torch.float16
    return VECTOR_DTYPES[spec]


def run_hash(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def compose(
    opts: ComposeRequest,
    clip: Any | None = None,
    dist: Dist | None = None,
    reporter: Reporter | None = None,
    on_epoch: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ComposeReport:
    """Learn the coefficients and (rank 0) store them; returns the report. `clip`: the model
    `opts.model` names, when the caller has loaded it already (on its DDP device)."""
    from tvtool.models.functional import visual_params

    dist = dist or Dist()
    store = Store(opts.store)
    objective = get_objective(opts.objective.name)
    threshold = threshold_of(opts.objective)
    data = data_specs(
        list(opts.data), opts.val, opts.classnames, opts.negate, opts.control, opts.heads
    )
    if clip is None:
        clip = opts.model.load(warn=warn)

    sel_digest, keep, vectors = None, None, list(opts.vectors)
    if opts.selection:
        sel_digest, sel = load_selection(store, opts.selection)
        vectors = vectors or list(sel.vectors)
    tower = visual_params(clip)
    plan = plan_bank(
        store,
        vectors,
        tower,
        set(clip.model.state_dict()),
        clip.base_fingerprint,
        opts.allow_other_base,
        warn,
    )
    if opts.selection:
        keep = selection_keep(sel, plan)
    try:
        layout = build_layout(
            plan,
            opts.granularity,  # type: ignore[arg-type]
            opts.partitions,
            opts.seed,
            opts.partition_rule,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise TvtoolError(f"{e}") from None
    dtype = vector_dtype(
        opts.vector_dtype, clip.device, [v.manifest.dtype or "" for v in plan.vectors]
    )
    n_bytes = stored_bytes(plan, dtype, keep)
    if n_bytes == 0:
        raise TvtoolError("the selection keeps no (vector, block) pair of these vectors")

    recipe = resolve_recipe(opts, objective.name, [d.role for d in data])
    tasks = [
        prepare_data(
            clip,
            spec,
            objective,
            shots=opts.shots,
            val_split=opts.val_split,
            seed=opts.seed,
            templates=opts.templates,
            store=store,
            threshold=threshold,  # type: ignore[arg-type]
            batch_size=max(recipe.batch_size, 64),
            dist=dist,
            split=opts.split,
        )
        for spec in data
    ]
    _unique_names(tasks)
    lr = recipe.lr
    settings = Settings(
        epochs=recipe.epochs,
        lr=lr,
        batch_size=recipe.per_set_batch(len(tasks)),
        grad_accum=opts.grad_accum,
        seed=opts.seed,
        weight_decay=recipe.weight_decay,
        workers=_workers(opts, clip, dist),
        augment=recipe.augment,
        flip=opts.flip,
        schedule=recipe.schedule,
        clip_grad=recipe.clip_grad,
        min_steps=recipe.min_steps,
        finetuned=_finetuned(opts.finetuned_acc, tasks),
        threshold=threshold if threshold is not None else 0.99,
    )
    config = {
        "vectors": plan.digests,
        "base": clip.base_fingerprint,
        "model": clip.name,
        "data": [
            {
                "path": t.info["path"],
                "role": t.role,
                "train": t.train_idx,
                "labels": t.labels,
                "val": str(t.eval_folder.root) if t.eval_folder is not None else None,
                "val_idx": t.eval_idx,
            }
            for t in tasks
        ],
        "objective": objective.name,
        "threshold": threshold,
        "layout": layout.model_dump(),
        "selection": sel_digest,
        "vector_dtype": str(dtype),
        "templates": opts.templates,
        "settings": {k: v for k, v in asdict(settings).items() if k != "workers"},
    }
    run_dir = store.tmp_dir / "compose-runs" / run_hash(config)[:24]
    stacks = load_stacks(store, plan, clip.device, dtype, keep)
    attach_layout(layout, stacks)
    coefs = Coefs(learnable_mask(layout, stacks), init=opts.init, clamp=opts.clamp)
    trainer = Trainer(clip, stacks, layout, coefs, tasks, objective, settings, dist, run_dir)
    total_steps = trainer.steps * settings.epochs
    if warn and total_steps < MIN_STEPS:
        warn(
            f"only {total_steps} optimisation steps ({trainer.steps} per epoch): "
            "consider more --epochs"
        )
    result = trainer.fit(resume=opts.resume, reporter=reporter, on_epoch=on_epoch)

    chosen = result.history[result.epoch]
    params = {
        "layout": layout.model_dump(),
        "base_fingerprint": clip.base_fingerprint,
        "model": clip.name,
        "objective": objective.name,
        "shots": opts.shots,
        "seed": opts.seed,
        "lr": lr,
        "recipe": recipe.name,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "grad_accum": opts.grad_accum,
        "weight_decay": settings.weight_decay,
        "schedule": settings.schedule,
        "clip_grad": settings.clip_grad,
        "augment": settings.augment,
        "oversampling": trainer.repeats,
        "init": opts.init,
        "clamp": list(opts.clamp) if opts.clamp else None,
        "threshold": threshold,
        "data": [{"name": t.name, "role": t.role, **t.info} for t in tasks],
        "selection": sel_digest,
        "learnable": coefs.n_learnable,
        "vector_dtype": _dtype_name(dtype),
        "select_by": result.select_by,
        "epoch": result.epoch,
        "val_acc": chosen["val_acc"],
        "base_val_acc": result.base_acc,
        "history": result.history,
        "world_size": dist.world,
    }
    report = ComposeReport(
        digest=None,
        name=opts.name,
        vectors=[VectorRef(digest=v.digest, label=v.label) for v in plan.vectors],
        blocks=len(layout.blocks),
        groups=layout.n_groups,
        learnable=coefs.n_learnable,
        vector_bytes=n_bytes,
        steps=total_steps,
        device=str(clip.device),
        resumed_from=result.resumed_from,
        **{k: params[k] for k in _REPORTED},
        recipe=recipe.name,
        settings=ComposeSettings(**{k: params[k] for k in ComposeSettings.model_fields}),
        coefs=result.coefs.tolist(),
        block_names=[b.name for b in layout.blocks],
    )
    if dist.main:
        manifest = save_tensor_object(
            store,
            "coefs",
            {"coefs": result.coefs.float().contiguous()},
            inputs=plan.digests,
            params=params,
        )
        report.digest = manifest.digest
        if opts.name:
            store.set_ref(opts.name, manifest.digest, force=opts.force)
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    return report


def resolve_recipe(opts: ComposeRequest, objective: str, roles: list[str]) -> Recipe:
    """The authors' settings for this kind of run (tvtool.compose.recipes), with every option the
    user gave taking precedence. batch_size stays 'over all data sets' until `per_set_batch`."""
    r = recipe_for(objective, roles)
    given = {
        "lr": opts.lr,
        "epochs": opts.epochs,
        "weight_decay": opts.weight_decay,
        "schedule": opts.schedule,
        "augment": opts.augment,
        "min_steps": opts.min_steps,
    }
    r = r.with_(**{k: v for k, v in given.items() if v is not None})
    if opts.clip_grad is not None:
        r = r.with_(clip_grad=opts.clip_grad or None)
    if opts.batch_size is not None:  # the user's batch is per data set
        r = r.with_(batch_size=opts.batch_size, split_batch=False)
    if r.epochs < 1:
        raise TvtoolError("--epochs must be >= 1")
    return r


def _finetuned(accs: dict[str, float] | None, tasks: list) -> dict[str, float] | None:
    if not accs:
        return None
    missing = [t.name for t in tasks if t.role == "task" and t.name not in accs]
    if missing:
        raise TvtoolError(f"--finetuned-acc has no accuracy for data set(s) {', '.join(missing)}")
    return accs


def _workers(opts: ComposeRequest, clip: Any, dist: Dist) -> int:
    """Data-loading processes: as asked; by default none on CPU (the cores compute), and up to 8
    per process on CUDA (decoding and augmenting images must keep up with the GPU)."""
    if opts.workers is not None:
        return opts.workers
    if clip.device.type != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(1, dist.world) - 1))


def _unique_names(tasks: list) -> None:
    seen: dict[str, int] = {}
    for t in tasks:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        if n:
            t.name = f"{t.name}#{n + 1}"


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in VECTOR_DTYPES.items()}[dtype]
