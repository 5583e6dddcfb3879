"""Built-in data sets of the task-vector papers: class names and prompt templates as published.

One JSON file per data set in ``builtin/`` (facts read from the authors' code: task_vectors /
atlas ``src/datasets``, FusionBench ``tasks/clip_classification``, openai/CLIP ``data/prompts.md``;
each file names its sources and commits). Where atlas names classes from the data (Caltech,
UCF-101), the stored list is its rule applied to the standard release, so integer-labelled copies
get the same names; folder data is renamed by that rule (`data_names`) before it is matched.
Suites: ``ta8`` (task arithmetic, Ilharco et al.), ``tall14``/``tall20`` (Wang et al.,
FusionBench), ``atlas22`` (Zhang et al.). A data set may carry ``variants`` where another code
base spells class names or templates differently (``fusionbench``; ``openai``: CLIP's lists);
``NAME:VARIANT`` picks one.

On the command line ``--data NAME=PATH`` takes the class names and templates of data set NAME for
the data at PATH. The data's own classes (folder names, ClassLabel names, CSV labels) are matched
to the published names: by name (case, ``_`` and ``-`` ignored), by integer label, or, when the
names differ but the counts agree, by position (sorted folders, as torchvision's ImageFolder that
these code bases used orders them).

Torch-free: `tvtool datasets ls` reads only JSON.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tvtool.errors import TvtoolError

SUITES = {
    "ta8": "task arithmetic (Ilharco et al. 2023): 8 data sets",
    "tall14": "TALL masks / FusionBench (Wang et al. 2024): 14 data sets",
    "tall20": "TALL masks / FusionBench (Wang et al. 2024): 20 data sets",
    "atlas22": "aTLAS (Zhang et al. 2024): 22 data sets",
}


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classnames: list[str] | None = None
    templates: list[str] | None = None
    source: str


class BuiltinDataset(BaseModel):
    """One data set: names, templates and where they were read from."""

    model_config = ConfigDict(extra="forbid")
    name: str
    title: str
    aliases: list[str] = []
    suites: list[str] = []
    hf: str | None = None  # the Hugging Face hub data set FusionBench reads
    classnames: list[str] | None = None  # None: class names come from the data
    # how the data's own labels become class names when `classnames` is None: regex
    # substitutions applied in order (None: tvtool's default, "_" -> " ")
    data_names: list[tuple[str, str]] | None = None
    templates: list[str]
    sources: dict[str, str | None]
    note: str | None = None
    variants: dict[str, Variant] = {}
    variant: str | None = None  # set when a variant was applied

    def with_variant(self, v: str) -> BuiltinDataset:
        if v not in self.variants:
            have = ", ".join(sorted(self.variants)) or "none"
            raise TvtoolError(f"data set {self.name!r} has no variant {v!r} (variants: {have})")
        var = self.variants[v]
        return self.model_copy(
            update={
                "classnames": var.classnames if var.classnames is not None else self.classnames,
                "templates": var.templates if var.templates is not None else self.templates,
                "sources": {
                    **self.sources,
                    **{k: var.source for k in ("classnames", "templates")
                       if getattr(var, k) is not None},
                },
                "variant": v,
            }
        )


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


@cache
def _all() -> dict[str, BuiltinDataset]:
    root = resources.files("tvtool.datasets") / "builtin"
    out = {}
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json"):
            d = BuiltinDataset.model_validate(json.loads(f.read_text(encoding="utf-8")))
            out[d.name] = d
    return out


@cache
def _aliases() -> dict[str, str]:
    out = {}
    for d in _all().values():
        for a in [d.name, *d.aliases]:
            out[_key(a)] = d.name
    return out


def names(suite: str | None = None) -> list[str]:
    """Built-in data set names (of one suite), in file order."""
    if suite is not None and suite not in SUITES:
        raise TvtoolError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}")
    return [n for n, d in _all().items() if suite is None or suite in d.suites]


def lookup(name: str) -> BuiltinDataset | None:
    """The data set called `name` (or an alias; ``NAME:VARIANT`` applies a variant), else None."""
    base, _, variant = name.partition(":")
    found = _aliases().get(_key(base))
    if found is None:
        return None
    d = _all()[found]
    return d.with_variant(variant) if variant else d


def get(name: str) -> BuiltinDataset:
    d = lookup(name)
    if d is None:
        raise TvtoolError(
            f"unknown data set {name!r}: see `tvtool datasets ls` "
            f"(e.g. {', '.join(list(_all())[:4])})"
        )
    return d


def parse_data_arg(value: str | Path) -> tuple[BuiltinDataset | None, Path]:
    """``NAME=PATH`` -> (built-in data set, PATH); a plain PATH -> (None, PATH).

    A value whose part before the first ``=`` is not a data set name is a path (when it exists)
    or an error naming the unknown data set."""
    s = str(value)
    head, sep, tail = s.partition("=")
    if sep and "/" not in head and head:
        d = lookup(head)
        if d is not None:
            return d, Path(tail).expanduser()
        if not Path(s).expanduser().exists():
            get(head)  # raises: unknown data set
    return None, Path(s).expanduser()


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.lower()).strip()


def _rename(d: BuiltinDataset, data_classes: list[str]) -> list[str]:
    """The data's labels renamed as the code base does (`data_names`; default ``_`` -> space)."""
    if d.data_names is None:
        return [c.replace("_", " ") for c in data_classes]
    out = []
    for c in data_classes:
        for pattern, repl in d.data_names:
            c = re.sub(pattern, repl, c)
        out.append(c)
    return out


def match_classnames(
    d: BuiltinDataset, data_classes: list[str], where: str
) -> tuple[list[str], str]:
    """Published class names in the data's class order, and how they were matched
    ("name", "index" or "position"). `data_classes` are the data's own labels in class-index
    order (folder names, ClassLabel names, CSV labels)."""
    pub = d.classnames
    renamed = _rename(d, data_classes)
    if pub is None:
        return renamed, "data"
    by_name = {_norm(c): c for c in pub}
    for cands in (renamed, data_classes):  # the code base's renaming first (Caltech folders)
        if all(_norm(c) in by_name for c in cands):
            return [by_name[_norm(c)] for c in cands], "name"
    if all(c.strip().isdigit() and int(c) < len(pub) for c in data_classes):
        return [pub[int(c)] for c in data_classes], "index"
    if len(data_classes) == len(pub):
        return list(pub), "position"
    raise TvtoolError(
        f"{where}: {len(data_classes)} classes, but data set {d.name!r} has {len(pub)} "
        f"(its classes do not match by name either, e.g. {data_classes[0]!r})"
    )
