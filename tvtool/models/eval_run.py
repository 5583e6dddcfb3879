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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tvtool.errors import TvtoolError


@dataclass
class EvalOptions:
    model: str | None = None
    model_config: Path | None = None
    base: Path | None = None
    pretrained: str | None = None
    quick_gelu: bool | None = None
    text_tower: str | None = None
    heads: list[Path] | None = None  # head files, one per --data (instead of the text tower)
    vectors: list[str] = field(default_factory=list)
    weights: Path | None = None
    coefs: str | None = None
    data: list[Path] = field(default_factory=list)
    split: str = "test"
    classnames: list[Path] | None = None
    templates: Path | None = None
    grid: str | None = None
    val: list[Path] | None = None
    finetuned_acc: Path | None = None
    finetuned: list[Path] | None = None
    disentanglement: tuple[str, str] | None = None
    alphas: str = "0:1:0.25"
    allow_other_base: bool = False
    device: str = "auto"
    batch_size: int = 128


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


def _check_modes(o: EvalOptions) -> str:
    modes = [
        m for m, on in (("vectors", o.vectors), ("weights", o.weights), ("coefs", o.coefs)) if on
    ]
    if o.disentanglement:
        if modes:
            raise TvtoolError(
                "--disentanglement evaluates the base with its two vectors: drop the other weights"
            )
        modes = ["disentanglement"]
    if len(modes) > 1:
        raise TvtoolError(f"give one of VECTOR..., --weights or --coefs (got {', '.join(modes)})")
    mode = modes[0] if modes else "base"
    if o.grid is not None and mode != "vectors":
        raise TvtoolError(
            "--grid searches the scale of task vectors: give VECTOR[:w]... with --base"
        )
    if o.weights is not None and o.base is None and o.pretrained is None:
        return "weights-as-base"
    return mode


def _finetuned_accs(clip, o: EvalOptions, sets, store, on_note) -> dict[str, float] | None:
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
    o: EvalOptions,
    store,
    on_note: Callable[[str], None] = lambda m: None,
    on_progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> dict:
    """Evaluate as `o` says; returns the report."""
    from tvtool.datasets.images import open_folders
    from tvtool.datasets.registry import parse_data_arg
    from tvtool.datasets.sources import has_split
    from tvtool.models import evaluate as ev
    from tvtool.models.build import load_clip
    from tvtool.models.heads import load_templates
    from tvtool.models.weights import (
        apply_delta,
        checkpoint_override,
        coefs_delta,
        parse_weighted,
        vectors_delta,
    )

    mode = _check_modes(o)
    base = o.weights if mode == "weights-as-base" else o.base
    clip = load_clip(
        o.model,
        o.model_config,
        base,
        o.pretrained,
        device=o.device,
        quick_gelu=o.quick_gelu,
        text_tower=o.text_tower,
        warn=on_note,
    )
    if o.heads and len(o.heads) != len(o.data):
        raise TvtoolError(
            f"give one --head file per --data set ({len(o.data)}), not {len(o.heads)}"
        )
    templates = load_templates(o.templates) if o.templates else None  # None: per data set
    folders = open_folders(o.data, o.split, o.classnames)
    cached = o.grid is not None or mode == "disentanglement"
    workers = min(8, os.cpu_count() or 1) if clip.device.type == "cuda" else 0
    sets = ev.prepare(clip, folders, templates, store, o.batch_size, cached, workers, o.heads)
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        on_note("several --data sets share a name; reports key them by position")
    report: dict = {
        "model": clip.name,
        "base": clip.source,
        "base_fingerprint": clip.base_fingerprint,
        "device": str(clip.device),
        "split": o.split,
        "templates": _template_counts(templates, folders),
        "weights": {"mode": "weights" if mode == "weights-as-base" else mode},
        "scale": None,
        "grid": None,
        "disentanglement": None,
    }
    step = on_progress or (lambda desc, total: lambda: None)
    override = None
    delta = None
    if mode == "vectors":
        items = [parse_weighted(v) for v in o.vectors]
        delta = vectors_delta(clip, store, items, o.allow_other_base)
        report["weights"]["vectors"] = [
            {"name": n, "digest": store.resolve(n, kind="vector"), "weight": w} for n, w in items
        ]
    elif mode == "coefs":
        delta, manifest = coefs_delta(clip, store, o.coefs, o.allow_other_base)  # type: ignore[arg-type]
        report["weights"]["coefs"] = manifest.digest
    elif mode == "weights":
        override, ignored = checkpoint_override(clip, o.weights)  # type: ignore[arg-type]
        report["weights"]["file"] = str(o.weights)
        if ignored:
            on_note(
                f"{ignored} tensor(s) of {o.weights.name} outside the image tower ignored "
                "(heads come from the base)"
            )  # type: ignore[union-attr]
    elif mode == "weights-as-base":
        report["weights"]["file"] = str(o.weights)

    if mode == "disentanglement":
        v1, v2 = o.disentanglement  # type: ignore[misc]
        deltas = [vectors_delta(clip, store, [(v, 1.0)], o.allow_other_base) for v in (v1, v2)]
        alphas = ev.parse_grid(o.alphas)
        report["weights"]["vectors"] = [
            {"name": v, "digest": store.resolve(v, kind="vector")} for v in (v1, v2)
        ]
        tick = step("disentanglement", 2 + len(alphas) ** 2)
        report["disentanglement"] = ev.disentanglement(clip, sets, deltas, alphas, tick)
        report["disentanglement"]["vectors"] = [v1, v2]

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
        search = ev.scale_search(
            clip, val_sets, delta, scales, ft_val, step("scale grid", len(scales))
        )  # type: ignore[arg-type]
        report["grid"] = search
        report["scale"] = search["best_scale"]
    elif delta is not None:
        report["scale"] = 1.0
    if delta is not None:
        override = apply_delta(clip, delta, report["scale"])

    ft = _finetuned_accs(clip, o, sets, store, on_note)
    results = [ev.accuracy(clip, es, override) for es in sets]
    for r in results:
        r["normalised"] = ev.normalised(r["accuracy"], ft.get(r["dataset"])) if ft else None
    report["results"] = results
    report["mean_accuracy"] = sum(r["accuracy"] for r in results) / len(results)
    norms = [r["normalised"] for r in results]
    report["mean_normalised"] = (
        sum(norms) / len(norms) if all(n is not None for n in norms) else None
    )
    return report


def headline(report: dict) -> float:
    """The number `-q` prints: mean xi in disentanglement mode, else the mean accuracy."""
    d = report.get("disentanglement")
    if d:
        vals: Sequence[float] = [x for row in d["xi"] for x in row]
        return sum(vals) / len(vals)
    return report["mean_accuracy"]


def _template_counts(templates: list[str] | None, folders: list) -> int | list[int]:
    """Templates per data set: one count when a --templates file applies to all."""
    from tvtool.models.heads import DEFAULT_TEMPLATES

    if templates:
        return len(templates)
    counts = [len(f.templates or DEFAULT_TEMPLATES) for f in folders]
    return counts[0] if len(set(counts)) == 1 else counts
