"""Evaluation: top-1 accuracy, the task-arithmetic scale search, weight disentanglement.

* Accuracy of a data set = share of its images whose argmax over the zero-shot logits (the
  data set's own head, from its class names) equals the folder label.
* Scale search (`--grid`): for every scale s, ``theta_0 + s * sum_t w_t tau_t`` is evaluated on the
  validation sets; the best s maximises the mean *normalised* accuracy (accuracy / the fine-tuned
  model's accuracy on that set) or, with no fine-tuned accuracies, the mean accuracy. Ties go to
  the smaller scale.
* Weight disentanglement error (Ortiz-Jimenez et al.) of vectors 1 and 2 on data sets 1 and 2:
  ``xi(a1, a2) = sum_t E_{x~D_t}[f(x; theta_0 + a_t tau_t) != f(x; theta_0 + a1 tau_1 + a2 tau_2)]``
  with f the predicted class under D_t's head; 0 = perfectly disentangled, at most 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tvtool.datasets.images import ImageSource, eval_transform, iter_batches
from tvtool.errors import TvtoolError
from tvtool.models.functional import autocast, encode_images, logits, visual_params
from tvtool.models.loaded import LoadedClip
from tvtool.models.weights import Delta, apply_delta

CONTROL_KEEP = 0.95  # negation keeps the control accuracy >= this x the base's (aTLAS's rule)
CACHE_BYTES = 1 << 30  # keep a set's preprocessed images in memory up to this size


@dataclass
class EvalSet:
    """A labelled folder with its head; preprocessed batches kept when small enough."""

    folder: ImageSource
    head: torch.Tensor
    batch_size: int
    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    workers: int = 0  # DataLoader worker processes decoding images (0: in this process)

    @property
    def name(self) -> str:
        return self.folder.name

    def iterate(self, clip: LoadedClip):
        if self.batches is not None:
            yield from self.batches
            return
        if self.workers > 0:
            subset = self.folder.subset(range(len(self.folder)), eval_transform(clip))
            yield from torch.utils.data.DataLoader(
                subset,
                batch_size=self.batch_size,
                num_workers=self.workers,
                pin_memory=clip.device.type == "cuda",
            )
            return
        yield from iter_batches(self.folder, None, eval_transform(clip), self.batch_size)


def prepare(
    clip: LoadedClip,
    folders: Sequence[ImageSource],
    templates: Sequence[str] | None,
    store=None,
    batch_size: int = 128,
    keep_in_memory: bool = False,
    workers: int = 0,
    heads: Sequence[Path] | None = None,
) -> list[EvalSet]:
    """One EvalSet per folder (head cached in `store` when given; from `heads[i]`, a head file,
    when given). `templates` None: each folder's own (a built-in data set's), else the
    defaults."""
    from tvtool.models.heads import zeroshot_head

    sets = []
    for i, f in enumerate(folders):
        if not f.labelled:
            raise TvtoolError(f"{f.root}: evaluation needs labelled data (class folders)")
        head_file = heads[i] if heads else None
        tpl = templates if templates is not None else f.templates
        head = zeroshot_head(clip, f.classnames, tpl, store=store, head_file=head_file)
        es = EvalSet(f, head, batch_size, workers=workers)
        h, w = clip.image_size
        if keep_in_memory and len(f) * 3 * h * w * 4 <= CACHE_BYTES:
            es.batches = list(es.iterate(clip))
        sets.append(es)
    return sets


@torch.no_grad()
def predict(
    clip: LoadedClip, es: EvalSet, override: Delta | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, label) for every image of the set, on the CPU."""
    preds, labels = [], []
    for x, y in es.iterate(clip):
        with autocast(clip.device):
            feats = encode_images(clip, override, x.to(clip.device, non_blocking=True))
        preds.append(logits(clip, feats.float(), es.head).argmax(dim=-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy(clip: LoadedClip, es: EvalSet, override: Delta | None) -> dict:
    pred, y = predict(clip, es, override)
    correct = int((pred == y).sum())
    return {
        "dataset": es.name,
        "path": str(es.folder.root),
        "n": len(y),
        "correct": correct,
        "accuracy": correct / len(y),
    }


def parse_grid(spec: str) -> list[float]:
    """``start:stop:step`` (stop included) or a comma list ``0.2,0.5`` -> values."""
    spec = spec.strip()
    try:
        if ":" in spec:
            start, stop, step = (float(p) for p in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step))
            values = [round(start + i * step, 10) for i in range(n + 1)]
        else:
            values = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise TvtoolError(
            f"bad grid {spec!r}: use START:STOP:STEP (e.g. 0:1:0.05) or a list 0.3,0.5"
        ) from None
    if not values or len(values) > 1000:
        raise TvtoolError(f"bad grid {spec!r}: between 1 and 1000 values")
    return values


def combine(clip: LoadedClip, deltas: Sequence[Delta], scales: Sequence[float]) -> Delta:
    """Override ``theta_0 + sum_k scales[k] * deltas[k]``."""
    params = visual_params(clip)
    out: Delta = {}
    for d, s in zip(deltas, scales, strict=True):
        for p, t in d.items():
            out[p] = (out[p] if p in out else params[p]) + s * t
    return out


def normalised(acc: float, ft: float | None) -> float | None:
    return acc / ft if ft else None


def scale_search(
    clip: LoadedClip,
    sets: Sequence[EvalSet],
    delta: Delta,
    scales: Sequence[float],
    finetuned: dict[str, float] | None,
    on_step: Callable[[], None] | None = None,
    control: str | None = None,
    keep: float = 0.95,
) -> dict:
    """Evaluate every scale on `sets`; pick the best (see the module docstring). With `control`
    (the name of one of the sets; negation): the scale of lowest mean accuracy on the other sets
    (the targets) among those keeping the control's accuracy >= keep x the base's (scale 0)."""
    use_norm = bool(finetuned) and all(finetuned.get(s.name) for s in sets)  # type: ignore[union-attr]
    rows = []
    for s in scales:
        override = apply_delta(clip, delta, s)
        accs = {es.name: accuracy(clip, es, override)["accuracy"] for es in sets}
        mean_acc = sum(accs.values()) / len(accs)
        norm = {n: a / finetuned[n] for n, a in accs.items()} if use_norm else None  # type: ignore[index]
        mean_norm = sum(norm.values()) / len(norm) if norm else None
        rows.append(
            {
                "scale": s,
                "accuracy": accs,
                "mean_accuracy": mean_acc,
                "normalised": norm,
                "mean_normalised": mean_norm,
            }
        )
        if on_step:
            on_step()
    if control is not None:
        return _negation_pick(clip, sets, rows, control, keep)
    key = "mean_normalised" if use_norm else "mean_accuracy"
    best = max(rows, key=lambda r: (r[key], -r["scale"]))
    return {"criterion": key, "best_scale": best["scale"], "rows": rows}


def _negation_pick(clip, sets, rows: list[dict], control: str, keep: float) -> dict:
    """The negation search: forget the targets most while the control keeps >= keep x the base
    accuracy (ties: the smaller |scale|); no eligible scale -> the base (scale 0)."""
    zero = [r for r in rows if r["scale"] == 0]
    if zero:
        base = zero[0]["accuracy"][control]
    else:
        base = accuracy(clip, next(s for s in sets if s.name == control), None)["accuracy"]
    for r in rows:
        targets = [a for n, a in r["accuracy"].items() if n != control]
        r["target_accuracy"] = sum(targets) / len(targets) if targets else None
        r["keeps_control"] = r["accuracy"][control] >= keep * base - 1e-12
    ok = [r for r in rows if r["keeps_control"]]
    best = min(ok, key=lambda r: (r["target_accuracy"], abs(r["scale"])))["scale"] if ok else 0.0
    return {
        "criterion": "negation",
        "best_scale": best,
        "rows": rows,
        "control": control,
        "base_control_accuracy": base,
        "keep": keep,
    }


def disentanglement(
    clip: LoadedClip,
    sets: Sequence[EvalSet],
    deltas: Sequence[Delta],
    alphas: Sequence[float],
    on_step: Callable[[], None] | None = None,
) -> dict:
    """xi(a1, a2) for every pair of alphas (rows: a1, columns: a2)."""
    if len(sets) != 2 or len(deltas) != 2:
        raise TvtoolError(
            "--disentanglement needs two vectors and two --data sets (one per vector)"
        )
    single = []  # single[t][i]: predictions on D_t with only vector t at alphas[i]
    for t in range(2):
        single.append([predict(clip, sets[t], apply_delta(clip, deltas[t], a))[0] for a in alphas])
        if on_step:
            on_step()
    xi = []
    for i, a1 in enumerate(alphas):
        row = []
        for j, a2 in enumerate(alphas):
            joint = combine(clip, deltas, (a1, a2))
            err = 0.0
            for t, idx in ((0, i), (1, j)):
                pred = predict(clip, sets[t], joint)[0]
                err += float((pred != single[t][idx]).float().mean())
            row.append(err)
            if on_step:
                on_step()
        xi.append(row)
    return {"alphas": list(alphas), "datasets": [s.name for s in sets], "xi": xi}
