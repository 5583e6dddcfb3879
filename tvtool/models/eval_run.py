"""`tvtool eval` as one function: resolve the inputs, evaluate, return the report (a JSON document).

Modes (at most one): the base alone; task vectors ``VECTOR[:w]...`` added to it (``theta_0 +
scale * sum_t w_t tau_t``, scale 1 or chosen by `grid`); a `coefs` object; fine-tuned `weights`
(its image tower; without a base the file is the whole model). The zero-shot head of each data set
always comes from the base's text tower. `disentanglement` is a mode of its own (base + 2 vectors).

Fine-tuned accuracies for normalisation come from a JSON file (``{"dataset": acc}`` with acc in
[0, 1], or percentages when any value is above 1, or the ``--json`` report of a `tvtool eval` run)
or are measured from fine-tuned checkpoints, one per data set in order, on the same split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from tvtool.errors import TvtoolError
from tvtool.models.eval_report import (
    AccuracyRow,
    Disentanglement,
    EvalReport,
    EvalWeights,
    ScaleSearch,
    WeightedVector,
)
from tvtool.models.spec import ModelSpec
from tvtool.request import Request


@dataclass(frozen=True)
class EvalMode:
    """What weights an eval measures, and the request field that asks for it."""

    name: str
    summary: str
    field: str | None  # the EvalRequest field that selects the mode (None: the default)
    flag: str  # how people ask for it
    owns: tuple[str, ...] = ()  # request fields only this mode accepts


EVAL_MODES: dict[str, EvalMode] = {
    m.name: m
    for m in (
        EvalMode("base", "the base model alone", None, "nothing"),
        EvalMode("vectors", "theta_0 + scale * sum_t w_t tau_t", "vectors", "VECTOR...",
                 ("grid",)),
        EvalMode("weights", "a fine-tuned checkpoint's image tower", "weights", "--weights"),
        EvalMode("coefs", "learned coefficients (a compose result)", "coefs", "--coefs"),
        EvalMode("disentanglement", "the weight-disentanglement error of two vectors",
                 "disentanglement", "--disentanglement"),
    )
}


class EvalRequest(Request):
    """What `tvtool eval` asks for (see the module docstring); `mode` says which weights."""

    model: ModelSpec = ModelSpec()
    heads: list[Path] = Field(default_factory=list)  # head files, one per --data
    vectors: list[str] = Field(default_factory=list)
    weights: Path | None = None
    coefs: str | None = None
    data: list[Path] = Field(default_factory=list)
    split: str = "test"
    classnames: list[Path] = Field(default_factory=list)
    templates: Path | None = None
    grid: str | None = None
    control: Path | None = None  # negation: with --grid keep this set's accuracy (evaluated last)
    val: list[Path] = Field(default_factory=list)
    finetuned_acc: Path | None = None
    finetuned: list[Path] = Field(default_factory=list)
    disentanglement: tuple[str, str] | None = None
    alphas: str = "0:1:0.25"
    allow_other_base: bool = False
    batch_size: int = Field(128, ge=1)
    store: Path | None = None

    @model_validator(mode="after")
    def _modes(self):
        if not self.data:
            raise TvtoolError("give --data DIR (one or more data sets)")
        n = len(self.data) + (self.control is not None)
        if self.heads and len(self.heads) != n:
            last = ", the --control's last" if self.control is not None else ""
            raise TvtoolError(
                f"give one --head file per --data set ({n}{last}), not {len(self.heads)}"
            )
        if self.control is not None and self.grid is None:
            raise TvtoolError("--control is the negation search of --grid: give --grid too")
        self.mode  # noqa: B018  (checks the weights asked for)
        return self

    @property
    def mode(self) -> str:
        """The EVAL_MODES name, or 'weights-as-base' (--weights without a base: the file is the
        whole model)."""
        asked = [m for m in EVAL_MODES.values() if m.field and getattr(self, m.field)]
        if len(asked) > 1 and any(m.name == "disentanglement" for m in asked):
            raise TvtoolError(
                "--disentanglement evaluates the base with its two vectors: drop the other weights"
            )
        if len(asked) > 1:
            raise TvtoolError(
                f"give one of {', '.join(m.flag for m in EVAL_MODES.values() if m.field)} "
                f"(got {', '.join(m.name for m in asked)})"
            )
        mode = asked[0] if asked else EVAL_MODES["base"]
        for m in EVAL_MODES.values():
            for f in m.owns:
                if m is not mode and getattr(self, f) is not None:
                    raise TvtoolError(
                        f"--{f} searches the scale of task vectors: give {m.flag} with --base"
                    )
        if mode.name == "weights" and self.model.base is None and self.model.pretrained is None:
            return "weights-as-base"
        return mode.name


def load_finetuned_acc(path: Path) -> dict[str, float]:
    """{data set name: accuracy in [0, 1]} from a mapping or a `tvtool eval --json` report."""
    try:
        doc = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise TvtoolError(f"cannot read fine-tuned accuracies from {path}: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("results"), list):
        doc = {r.get("dataset"): r.get("accuracy") for r in doc["results"] if isinstance(r, dict)}
    if not isinstance(doc, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in doc.items()
    ):
        raise TvtoolError(
            f'{path}: expected {{"dataset": accuracy, ...}} or a tvtool eval --json report'
        )
    scale = 100.0 if any(v > 1 for v in doc.values()) else 1.0
    return {k: float(v) / scale for k, v in doc.items()}


def _finetuned_accs(clip, o: EvalRequest, sets, store, on_note) -> dict[str, float] | None:
    """Fine-tuned accuracy per data-set name for `sets` (None when not given)."""
    from tvtool.models.evaluate import accuracy
    from tvtool.models.weights import checkpoint_override

    if o.finetuned_acc is not None:
        accs = load_finetuned_acc(o.finetuned_acc)
        missing = [s.name for s in sets if s.name not in accs]
        if missing:
            raise TvtoolError(
                f"{o.finetuned_acc} has no accuracy for data set(s) {', '.join(missing)}"
            )
        return accs
    if o.finetuned:
        if len(o.finetuned) != len(sets):
            raise TvtoolError(
                f"give one --finetuned checkpoint per --data set ({len(sets)}), "
                f"not {len(o.finetuned)}"
            )
        out = {}
        for path, es in zip(o.finetuned, sets, strict=True):
            override, _ = checkpoint_override(clip, path)
            out[es.name] = accuracy(clip, es, override)["accuracy"]
            on_note(f"fine-tuned {path.name}: {out[es.name]:.2%} on {es.name}")
        return out
    return None


def run_eval(
    o: EvalRequest,
    on_note: Callable[[str], None] = lambda m: None,
    on_progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> EvalReport:
    """Evaluate as `o` says; returns the report."""
    from tvtool.datasets.registry import parse_data_arg
    from tvtool.datasets.sources import has_split, open_folders
    from tvtool.models import evaluate as ev
    from tvtool.models.heads import load_templates
    from tvtool.models.weights import (
        apply_delta,
        checkpoint_override,
        coefs_delta,
        parse_weighted,
        vectors_delta,
    )
    from tvtool.store.store import Store

    mode = o.mode
    if o.control is not None:  # evaluated like any --data set, placed last
        o = o.model_copy(update={"data": [*o.data, o.control]})
    store = Store(o.store)
    clip = o.model.load(base=o.weights if mode == "weights-as-base" else None, warn=on_note)
    templates = load_templates(o.templates) if o.templates else None  # None: per data set
    folders = open_folders(o.data, o.split, o.classnames)
    cached = o.grid is not None or mode == "disentanglement"
    workers = min(8, os.cpu_count() or 1) if clip.device.type == "cuda" else 0
    sets = ev.prepare(clip, folders, templates, store, o.batch_size, cached, workers, o.heads)
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        on_note("several --data sets share a name; reports key them by position")
    weights = EvalWeights(mode="weights" if mode == "weights-as-base" else mode)
    scale: float | None = None
    search: ScaleSearch | None = None
    dis: Disentanglement | None = None
    step = on_progress or (lambda desc, total: lambda: None)
    override = None
    delta = None
    if mode == "vectors":
        items = [parse_weighted(v) for v in o.vectors]
        delta = vectors_delta(clip, store, items, o.allow_other_base)
        weights.vectors = [
            WeightedVector(name=n, digest=store.resolve(n, kind="vector"), weight=w)
            for n, w in items
        ]
    elif mode == "coefs":
        delta, manifest = coefs_delta(clip, store, o.coefs, o.allow_other_base)  # type: ignore[arg-type]
        weights.coefs = manifest.digest
    elif mode == "weights":
        override, ignored = checkpoint_override(clip, o.weights)  # type: ignore[arg-type]
        weights.file = str(o.weights)
        if ignored:
            on_note(
                f"{ignored} tensor(s) of {o.weights.name} outside the image tower ignored "
                "(heads come from the base)"
            )  # type: ignore[union-attr]
    elif mode == "weights-as-base":
        weights.file = str(o.weights)

    if mode == "disentanglement":
        v1, v2 = o.disentanglement  # type: ignore[misc]
        deltas = [vectors_delta(clip, store, [(v, 1.0)], o.allow_other_base) for v in (v1, v2)]
        alphas = ev.parse_grid(o.alphas)
        weights.vectors = [
            WeightedVector(name=v, digest=store.resolve(v, kind="vector")) for v in (v1, v2)
        ]
        tick = step("disentanglement", 2 + len(alphas) ** 2)
        dis = Disentanglement(
            **ev.disentanglement(clip, sets, deltas, alphas, tick), vectors=[v1, v2]
        )

    if o.grid is not None:
        scales = ev.parse_grid(o.grid)
        val_dirs = o.val or o.data
        if not o.val:
            missing = [str(parse_data_arg(d)[1]) for d in o.data if not has_split(d, "val")]
            if missing:
                raise TvtoolError(
                    f"--grid needs validation data: give --val DIR... or create {missing[0]}/val"
                )
        if len(val_dirs) != len(o.data):
            raise TvtoolError(
                f"give one --val directory per --data set ({len(o.data)}), not {len(val_dirs)}"
            )
        val_folders = open_folders(
            val_dirs, "val", o.classnames, datasets=[f.dataset for f in folders]
        )
        val_sets = ev.prepare(
            clip, val_folders, templates, store, o.batch_size, True, workers, o.heads
        )
        for vs, ts in zip(val_sets, sets, strict=True):
            vs.folder.name = ts.name  # a validation set reports under its test set's name
        ft_val = _finetuned_accs(clip, o, val_sets, store, on_note)
        found = ev.scale_search(
            clip,
            val_sets,
            delta,  # type: ignore[arg-type]
            scales,
            ft_val,
            step("scale grid", len(scales)),
            control=val_sets[-1].name if o.control is not None else None,
            keep=ev.CONTROL_KEEP,
        )
        search = ScaleSearch.model_validate(found)
        scale = search.best_scale
    elif delta is not None:
        scale = 1.0
    if delta is not None:
        override = apply_delta(clip, delta, scale)  # type: ignore[arg-type]

    ft = _finetuned_accs(clip, o, sets, store, on_note)
    results = []
    for es in sets:
        r = ev.accuracy(clip, es, override)
        norm = ev.normalised(r["accuracy"], ft.get(r["dataset"])) if ft else None
        results.append(AccuracyRow(**r, normalised=norm))
    norms = [r.normalised for r in results if r.normalised is not None]
    return EvalReport(
        model=clip.name,
        base=clip.source,
        base_fingerprint=clip.base_fingerprint,
        device=str(clip.device),
        split=o.split,
        templates=_template_counts(templates, folders),
        weights=weights,
        scale=scale,
        grid=search,
        disentanglement=dis,
        results=results,
        mean_accuracy=sum(r.accuracy for r in results) / len(results),
        mean_normalised=sum(norms) / len(norms) if len(norms) == len(results) else None,
    )


def _template_counts(templates: list[str] | None, folders: list) -> int | list[int]:
    """Templates per data set: one count when a --templates file applies to all."""
    from tvtool.models.heads import DEFAULT_TEMPLATES

    if templates:
        return len(templates)
    counts = [len(f.templates or DEFAULT_TEMPLATES) for f in folders]
    return counts[0] if len(set(counts)) == 1 else counts
