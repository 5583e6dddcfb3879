"""The training loop: AdamW on Lambda with a cosine schedule, one checkpoint per epoch, --resume.

Each micro-batch composes theta from the current Lambda, runs every data set's batch through the
image tower (autocast on CUDA) and backpropagates sum_k sign_k * mean-over-the-step(loss_k); the
per-rank loss is scaled so that DistributedDataParallel's gradient average equals that global
mean exactly, whatever the sharding. After every epoch: validation accuracy, model selection
(`Trainer._better`: best validation accuracy; for negation the most forgetting that keeps the
control accuracy; else the last epoch), a checkpoint (rank 0). A resumed run restores Lambda,
the optimiser and scheduler states and the history, and continues with the same seeded batches
and augmentations, so it ends bit-for-bit where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from tvtool.compose.coefs import Coefs, compose_params
from tvtool.compose.ddp import Dist
from tvtool.compose.objectives import SIGN, Objective, keeps_control, ufm_loss
from tvtool.compose.prepare import LabelledSubset, PreparedData
from tvtool.compose.sampling import SeededView, collate, epoch_plan, shard, steps_per_epoch
from tvtool.datasets import images as mdata
from tvtool.errors import TvtoolError
from tvtool.models.bank import Stack, share_base
from tvtool.models.functional import autocast, autocast_dtype, encode_images, visual_params
from tvtool.vectors.blocks import CoefsLayout

SelectBy = Literal["val", "negation", "last"]
CHECKPOINT = "checkpoint.pt"


@dataclass
class Settings:
    epochs: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    workers: int = 0
    augment: str = "mild"  # atlas | clip | none | mild | strong (see `train_views`)
    flip: bool = False  # force horizontal flips on (atlas already flips)
    schedule: str = "cosine"  # cosine (no warm-up) | constant
    clip_grad: float | None = None  # max gradient norm of Lambda per step
    min_steps: int = 0  # oversample training sets so an epoch has >= this many steps
    finetuned: dict[str, float] | None = None  # fine-tuned accuracies: select by normalised acc
    threshold: float = 0.99  # ufm: confidence a weak-view prediction needs to become a target


class Reporter(Protocol):
    def start_epoch(self, epoch: int, steps: int) -> None: ...
    def step(self) -> None: ...
    def end_epoch(self, record: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    coefs: torch.Tensor  # [T, G] of the chosen epoch (see Trainer._better)
    epoch: int  # the epoch it comes from (0 = the base model)
    history: list[dict[str, Any]]
    select_by: SelectBy
    resumed_from: int | None = None
    base_acc: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        clip: Any,
        stacks: Sequence[Stack],
        layout: CoefsLayout,
        coefs: Coefs,
        tasks: Sequence[PreparedData],
        objective: Objective,
        settings: Settings,
        dist: Dist,
        run_dir: Path | None = None,
    ):
        if settings.epochs < 1 or settings.batch_size < 1 or settings.grad_accum < 1:
            raise TvtoolError("--epochs, --batch-size and --grad-accum must be >= 1")
        self.clip, self.stacks, self.layout = clip, list(stacks), layout
        self.tasks, self.objective, self.s, self.dist = list(tasks), objective, settings, dist
        self.device = clip.device
        self.coefs = coefs.to(self.device)
        self.module = dist.wrap(self.coefs, self.device)
        self.base = visual_params(clip)
        share_base(self.stacks, self.base)
        self.theta_buffers: dict[int, torch.Tensor] = {}  # theta reused step after step
        self.scale = clip.logit_scale
        self.run_dir = run_dir
        self.opt = torch.optim.AdamW(
            self.coefs.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        per_step = settings.batch_size * settings.grad_accum
        self.repeats = [oversampling(len(t.train_idx), per_step, settings.min_steps) for t in tasks]
        self.sizes = [len(t.train_idx) * r for t, r in zip(self.tasks, self.repeats, strict=True)]
        self.steps = steps_per_epoch(self.sizes, settings.batch_size, settings.grad_accum)
        if settings.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.opt, T_max=max(1, self.steps * settings.epochs)
            )
        elif settings.schedule == "constant":
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)
        else:
            raise TvtoolError(f"unknown --schedule {settings.schedule!r}: use cosine or constant")
        # fp16 autocast needs loss scaling (as the authors' GradScaler); bf16 has fp32's range
        self.scaler = (
            torch.amp.GradScaler("cuda") if autocast_dtype(self.device) == torch.float16 else None
        )
        tf = train_views(clip, settings.augment, settings.flip)
        if objective.online:  # (weak, strong) views of every image, as aTLAS's UFM
            tf = TwoViews(mdata.eval_transform(clip), tf)
        self.views = [
            SeededView(
                LabelledSubset(t.folder, t.train_idx * r, t.labels * r, tf), settings.seed, k
            )
            for k, (t, r) in enumerate(zip(self.tasks, self.repeats, strict=True))
        ]
        self.select_by: SelectBy = (
            "negation"
            if any(t.role == "target" for t in self.tasks)
            else "val"
            if any(t.eval_folder is not None for t in self.tasks)
            else "last"
        )

    # -- forward --------------------------------------------------------------------------
    def params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        return compose_params(lam, self.stacks, self.layout, self.base, self.theta_buffers)

    def logits(
        self, params: dict[str, torch.Tensor], images: torch.Tensor, head: torch.Tensor
    ) -> torch.Tensor:
        with autocast(self.device):
            feats = encode_images(self.clip, params, images.to(self.device, non_blocking=True))
        return self.scale * feats.float() @ head.T

    # -- one epoch ------------------------------------------------------------------------
    def _loaders(self, epoch: int, plan) -> list:
        loaders = []
        for k, view in enumerate(self.views):
            view.epoch = epoch
            batches = [micro.items[k] for step in plan for micro in step]
            loaders.append(
                iter(
                    torch.utils.data.DataLoader(
                        view,
                        batch_sampler=batches,
                        collate_fn=collate,
                        num_workers=self.s.workers,
                        pin_memory=self.device.type == "cuda",
                    )
                )
            )
        return loaders

    def train_epoch(self, epoch: int, reporter: Reporter | None) -> tuple[float, list[float]]:
        plan = epoch_plan(
            self.sizes,
            self.s.batch_size,
            self.s.grad_accum,
            self.s.seed,
            epoch,
            self.dist.rank,
            self.dist.world,
        )
        loaders = self._loaders(epoch, plan)
        task_loss = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        for step in plan:
            self.opt.zero_grad(set_to_none=True)
            for m, micro in enumerate(step):
                sync = m == len(step) - 1
                ctx = (
                    contextlib.nullcontext()
                    if sync or not self.dist.active
                    else self.module.no_sync()
                )
                with ctx:
                    lam = self.module()
                    params = self.params(lam)
                    loss = 0.0 * lam.sum()  # keeps every rank in the DDP graph, even with no data
                    for k, task in enumerate(self.tasks):
                        batch = next(loaders[k])
                        if batch is None:
                            continue
                        images, labels = batch
                        per = self._loss(params, images, labels.to(self.device), task.head)
                        part = per.sum() / micro.step_counts[k]
                        task_loss[k] += part.detach().double()  # no host sync per batch
                        loss = loss + SIGN[task.role] * part * self.dist.world
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            if self.s.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.coefs.parameters(), self.s.clip_grad)
            if self.scaler is None:
                self.opt.step()
            else:
                self.scaler.step(self.opt)
                self.scaler.update()
            self.sched.step()
            if reporter:
                reporter.step()
        task_loss = self.dist.all_reduce_sum(task_loss).cpu() / len(plan)
        total = sum(SIGN[t.role] * float(task_loss[k]) for k, t in enumerate(self.tasks))
        return total, [float(x) for x in task_loss]

    def _loss(self, params, images, labels, head) -> torch.Tensor:
        if not self.objective.online:
            return self.objective.loss(self.logits(params, images, head), labels)
        with torch.no_grad():
            weak = self.logits(params, images[:, 0], head)
        strong = self.logits(params, images[:, 1], head)
        return ufm_loss(strong, weak, labels, self.s.threshold)

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, lam: torch.Tensor) -> dict[str, float]:
        """Top-1 accuracy on every data set with validation images (sharded, summed)."""
        todo = [(k, t) for k, t in enumerate(self.tasks) if t.eval_folder is not None]
        if not todo:
            return {}
        params = self.params(lam.to(self.device))
        tf = mdata.eval_transform(self.clip)
        counts = torch.zeros(len(self.tasks), 2, dtype=torch.float64)
        for k, t in todo:
            idx = shard(t.eval_idx, self.dist.rank, self.dist.world)
            ds = LabelledSubset(t.eval_folder, idx, [t.eval_folder.samples[i][1] for i in idx], tf)
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=max(self.s.batch_size, 64),
                collate_fn=collate,
                num_workers=self.s.workers,
            )
            for batch in loader:
                images, labels = batch
                pred = self.logits(params, images, t.head).argmax(dim=-1).cpu()
                counts[k, 0] += float((pred == labels).sum())
                counts[k, 1] += len(labels)
        counts = self.dist.all_reduce_sum(counts.to(self.device)).cpu()
        return {
            self.tasks[k].name + _role_tag(self.tasks[k].role): float(counts[k, 0] / counts[k, 1])
            for k, _ in todo
        }

    def score(self, acc: dict[str, float], base: dict[str, float]) -> float | None:
        """Higher is better; None: not eligible (negation breaking the control constraint)."""
        if self.select_by == "negation":
            for t in self.tasks:
                name = t.name + _role_tag(t.role)
                if t.role == "control" and not keeps_control(acc[name], base[name]):
                    return None
            targets = [acc[t.name + _role_tag(t.role)] for t in self.tasks if t.role == "target"]
            return -sum(targets) / len(targets)
        if self.select_by == "val":
            ft = self.s.finetuned or {}
            vals = [
                acc[t.name] / ft[t.name] if ft.get(t.name) else acc[t.name]
                for t in self.tasks
                if t.role == "task" and t.name in acc
            ]
            return sum(vals) / len(vals)
        return 0.0

    def _better(self, score: float | None, best: float | None) -> bool:
        """last: always; val: ties go to the later (longer-trained) epoch; negation: ties keep
        the earlier epoch (the smaller edit)."""
        if self.select_by == "last":
            return True
        if score is None:
            return False
        if best is None:
            return True
        return score >= best if self.select_by == "val" else score > best

    # -- the whole run --------------------------------------------------------------------
    def fit(
        self,
        resume: bool = False,
        reporter: Reporter | None = None,
        on_epoch: Callable[[int], None] | None = None,
    ) -> FitResult:
        state = self._load() if resume else None
        if state is not None:
            start, history = int(state["epoch"]), list(state["history"])
            self.coefs.values.data.copy_(state["values"].to(self.device))
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            best_epoch, best_values, best_score = (
                state["best_epoch"],
                state["best_values"],
                state["best_score"],
            )
        else:
            start = 0
            zero = self.coefs.values.detach().cpu().clone()
            acc = self.evaluate(self.coefs.matrix())
            history = [
                {"epoch": 0, "train_loss": None, "task_losses": None, "val_acc": acc, "lr": None}
            ]
            best_epoch, best_values, best_score = 0, zero, self.score(acc, acc)
        base_acc = history[0]["val_acc"]
        for epoch in range(start + 1, self.s.epochs + 1):
            if reporter:
                reporter.start_epoch(epoch, self.steps)
            lr = self.opt.param_groups[0]["lr"]
            total, per_task = self.train_epoch(epoch, reporter)
            acc = self.evaluate(self.coefs.matrix())
            record = {
                "epoch": epoch,
                "train_loss": _finite(total),
                "lr": lr,
                "task_losses": {
                    t.name + _role_tag(t.role): _finite(x)
                    for t, x in zip(self.tasks, per_task, strict=True)
                },
                "val_acc": acc,
            }
            history.append(record)
            sc = self.score(acc, base_acc)
            if self._better(sc, best_score):
                best_epoch, best_values, best_score = (
                    epoch,
                    self.coefs.values.detach().cpu().clone(),
                    sc,
                )
            self._save(epoch, history, best_epoch, best_values, best_score)
            if reporter:
                reporter.end_epoch(record)
            if on_epoch:
                on_epoch(epoch)
        chosen = torch.zeros(self.coefs.shape).flatten()
        best = best_values.float()
        chosen[self.coefs.index.cpu()] = (
            best if self.coefs.clamp is None else best.clamp(*self.coefs.clamp)
        )
        return FitResult(
            chosen.view(self.coefs.shape),
            best_epoch,
            history,
            self.select_by,
            resumed_from=start if state is not None else None,
            base_acc=base_acc,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def _save(self, epoch: int, history, best_epoch: int, best_values, best_score) -> None:
        if self.run_dir is None:
            return
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "epoch": epoch,
                "values": self.coefs.values.detach().cpu(),
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": history,
                "best_epoch": best_epoch,
                "best_values": best_values,
                "best_score": best_score,
            }
            tmp = self.run_dir / f".{CHECKPOINT}.{os.getpid()}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.run_dir / CHECKPOINT)
        self.dist.barrier()

    def _load(self) -> dict[str, Any] | None:
        path = None if self.run_dir is None else self.run_dir / CHECKPOINT
        if path is None or not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: say so, start afresh
            raise TvtoolError(
                f"cannot read checkpoint {path} ({e}); delete it to start afresh"
            ) from None
        if state["values"].numel() != self.coefs.n_learnable:
            raise TvtoolError(f"checkpoint {path} does not fit this run; delete it to start afresh")
        return state


def oversampling(n: int, per_step: int, min_steps: int) -> int:
    """How many times to repeat a training set of n images so an epoch has >= min_steps steps of
    per_step images: aTLAS's rule (learn_few_shots.py), r = n / per_step; int(min_steps / r) + 1
    when r < min_steps, else 1."""
    if min_steps <= 0 or n <= 0:
        return 1
    r = n / per_step
    return int(min_steps / r) + 1 if r < min_steps else 1


class TwoViews:
    """(weak, strong) views of one image stacked: [2, C, H, W]."""

    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, image):
        return torch.stack([self.weak(image), self.strong(image)])


def train_views(clip: Any, augment: str, flip: bool = False):
    """The training transform: atlas = random resized crop 0.5-1 (aspect 3/4-4/3) + flip
    (aTLAS few-shot and UFM strong views); clip = open_clip's train preprocessing (crop 0.9-1, no
    flip; the authors' task addition / negation); none = the evaluation preprocessing
    (AdaMerging); mild = tvtool's crop 0.8-1 (aspect 0.9-1.1); strong = crop 0.5-1 + colour
    jitter. `flip` adds flips to clip/mild/strong."""
    if augment == "none":
        return mdata.eval_transform(clip)
    if augment == "atlas":
        return mdata.train_transform(clip, flip=True, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    if augment == "clip":
        return mdata.train_transform(clip, flip=flip, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
    if augment in ("mild", "strong"):
        return mdata.train_transform(clip, flip=flip, strong=augment == "strong")
    raise TvtoolError(f"unknown --augment {augment!r}: use atlas, clip, none, mild or strong")


def _role_tag(role: str) -> str:
    return "" if role == "task" else f" ({role})"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
