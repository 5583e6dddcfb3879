"""The authors' training settings per kind of `compose` run, each with its source (no torch here:
`tvtool compose --help` prints this table).

Which recipe a run gets: `--negate` -> negation; `--objective entropy` -> test-time (AdaMerging);
`--objective pseudo` -> test-time (aTLAS UFM); `ce` with several `--data` sets -> addition, with
one -> few-shot. Every setting can be overridden on the command line.

Sources (read from the released code, fredzzhang/atlas and EnnengYang/AdaMerging, FusionBench's
`config/method/adamerging.yaml`):

* few-shot, `src/learn_few_shots.py`: AdamW lr 1e-1, weight decay 0.1 (`src/args.py`), batch 128,
  10 epochs for ViTs, cosine schedule without warm-up, gradient norm clipped at 1.0, random
  resized crop (scale 0.5-1, bicubic) + horizontal flip, few-shot sets oversampled
  (`int(10 / r) + 1` times when an epoch would have r < 10 batches), best epoch by validation
  accuracy (the zero-shot model competes).
* addition, `src/learn_task_addition.py`: AdamW lr 1e-3 (`args.py` default), weight decay 0.1,
  batch 128 split evenly over the data sets, 20 epochs, constant learning rate, clipping at 1.0,
  the model's own train preprocessing (open_clip: random resized crop scale 0.9-1, no flip), best
  epoch by the mean *normalised* validation accuracy (accuracy / fine-tuned accuracy; give
  `--finetuned-acc FILE`, else the mean accuracy is used).
* negation, `src/learn_task_negation.py`: AdamW lr 1e-3 x a per-data-set multiplier (2-10, tuned
  for ViT-B-32; tvtool uses the median, 5, so 5e-3), weight decay 0.1, batch 128 (64 target + 64
  control), 2-20 epochs per data set (tvtool: 10), constant lr, clipping at 1.0, train
  preprocessing; kept: the lowest target accuracy whose control accuracy is >= 95% of the base's.
* test-time, pseudo-labels, `src/learn_ufm.py`: AdamW lr 1e-3, weight decay 0.1, batch 128, 10
  epochs, cosine, clipping at 1.0, strong views = random resized crop 0.5-1 + flip.
* test-time, entropy (AdaMerging, `src/main_*_adamerging.py`): Adam lr 1e-3 (= AdamW with weight
  decay 0), no clipping, no augmentation (the validation preprocessing), batches of 16 per data
  set (two per step there, i.e. 32: tvtool's default batch), 500 steps (`--epochs` x steps per
  epoch), coefficients from 0.3 clamped to [0, 1] (`--init 0.3 --clamp 0:1`; FusionBench's
  adamerging.yaml: lr 1e-3, init 0.3, batch 16, 1000 steps, no clamping). tvtool starts from 0
  unless `--init` is given, as aTLAS does.

On CUDA the forward pass runs under autocast, as the authors do: bf16 where the GPU has it (no
loss scaling needed), else fp16 with a gradient scaler (the authors' `GradScaler`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Schedule = Literal["cosine", "constant"]
Augment = Literal["atlas", "clip", "none", "mild", "strong"]
AUGMENTS: tuple[str, ...] = ("atlas", "clip", "none", "mild", "strong")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    name: str
    lr: float
    weight_decay: float
    batch_size: int  # images per optimisation step over all data sets (split: per set / n)
    split_batch: bool  # divide batch_size among the data sets (atlas) or per set (AdaMerging)
    epochs: int
    schedule: Schedule
    clip_grad: float | None  # max gradient norm (None: no clipping)
    augment: Augment
    min_steps: int  # oversample training sets so an epoch has >= this many steps (0: never)
    source: str

    def per_set_batch(self, n_sets: int) -> int:
        return max(1, self.batch_size // max(1, n_sets)) if self.split_batch else self.batch_size

    def with_(self, **changes) -> Recipe:
        return replace(self, **changes)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("few-shot", 1e-1, 0.1, 128, True, 10, "cosine", 1.0, "atlas", 10,
               "fredzzhang/atlas src/learn_few_shots.py"),
        Recipe("addition", 1e-3, 0.1, 128, True, 20, "constant", 1.0, "clip", 0,
               "fredzzhang/atlas src/learn_task_addition.py"),
        Recipe("negation", 5e-3, 0.1, 128, True, 10, "constant", 1.0, "clip", 0,
               "fredzzhang/atlas src/learn_task_negation.py"),
        Recipe("test-time-pseudo", 1e-3, 0.1, 128, True, 10, "cosine", 1.0, "atlas", 0,
               "fredzzhang/atlas src/learn_ufm.py"),
        Recipe("test-time-entropy", 1e-3, 0.0, 32, False, 10, "constant", None, "none", 0,
               "EnnengYang/AdaMerging src/main_layer_wise_adamerging.py"),
    )
}  # fmt: skip


def recipe_for(objective: str, roles: list[str]) -> Recipe:
    """The recipe of a run: its objective and the roles of its data sets."""
    if "target" in roles:
        return RECIPES["negation"]
    if objective == "entropy":
        return RECIPES["test-time-entropy"]
    if objective in ("pseudo", "ufm"):
        return RECIPES["test-time-pseudo"]
    return RECIPES["addition"] if roles.count("task") > 1 else RECIPES["few-shot"]


def help_table() -> str:
    """One line per recipe for --help."""
    rows = []
    for r in RECIPES.values():
        clip = f"clip {r.clip_grad:g}" if r.clip_grad else "no clip"
        over = f", oversample to {r.min_steps} steps/epoch" if r.min_steps else ""
        per = "split over sets" if r.split_batch else "per set"
        rows.append(
            f"{r.name}: lr {r.lr:g}, wd {r.weight_decay:g}, batch {r.batch_size} ({per}), "
            f"{r.epochs} epochs, {r.schedule}, {clip}, augment {r.augment}{over} "
            f"(source: {r.source})"
        )
    return "\n\n".join(rows)


def parse_clamp(spec: str | None) -> tuple[float, float] | None:
    """`--clamp LO:HI` -> (lo, hi)."""
    from tvtool.errors import TvtoolError

    if spec is None:
        return None
    lo, sep, hi = spec.partition(":")
    try:
        out = (float(lo), float(hi))
    except ValueError:
        out = None
    if not sep or out is None or out[0] > out[1]:
        raise TvtoolError(f"--clamp takes LO:HI with LO <= HI, e.g. 0:1 (got {spec!r})")
    return out
