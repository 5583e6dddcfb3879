"""Vocabulary resizes in `merge`: vectors extracted with ``extract --allow-resize``.

A fine-tune whose vocabulary grew (transformers' `resize_token_embeddings` appends rows) gives,
for each resized tensor K (``embed_tokens``, an untied ``lm_head``), the difference of the rows
both vocabularies share under K and the rows only the fine-tune has, whole, under
``K.added_rows`` (the manifest's ``params.resized``). Merged onto the base, K gets the grown
row count:

* rows ``[0, n_base)``: the method's merge of the base rows, every term contributing as for any
  other tensor (``base + sum_t w_t tau_t`` for `sum`; TIES, DARE, ... on the shared rows);
* rows ``[n_base, n)``: the added rows *taken whole* -- the stored rows of the vector that adds
  them, or, when several vectors add rows to K, the plain mean of their stored rows. Weights,
  `--scale` and the method do not touch them (an added token has no base row to scale a
  difference from). mergekit (``tokenizer_source: union``) does the same for a token one model
  adds (its embedding is every model's and the base's, so the merge returns it); for a token
  several models add it runs the method around their mean (the mean again for a linear merge
  whose weights sum to 1).

Rows are matched by *position*: tvtool reads no tokenizer, so vectors that add rows to one
tensor must add the same number (refused otherwise), and they are assumed to add the same tokens
in the same order (mergekit matches tokens by their strings). A negated term that adds rows and
a vector that shrinks the vocabulary are refused. An HF folder output (`--out DIR`) gets the
base's ``config.json`` with ``vocab_size`` set to the new row count; the tokenizer files copied
are the base's (a warning says to copy the fine-tune's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tvtool.checkpoints.readers import TensorMeta
from tvtool.errors import TvtoolError, few
from tvtool.vectors.extract import ADDED

if TYPE_CHECKING:
    from tvtool.checkpoints.writer import TensorSpec
    from tvtool.store.manifest import Manifest
    from tvtool.vectors.merge_out import OutputLayout
    from tvtool.vectors.merge_plan import PlannedTerm
    from tvtool.vectors.merge_stream import MergeInputs

TIED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                 "token_embedding.weight", "embed_in.weight", "embed_out.weight")


@dataclass
class Grown:
    """A tensor whose output has more rows than the base's."""

    base_rows: int
    rows: int
    sources: list[tuple[int, str]] = field(default_factory=list)  # (term, its added-rows key)


def resized_keys(manifest: Manifest | None) -> dict[str, dict[str, Any]]:
    """``params.resized`` of a vector ({} for one extracted without a resize)."""
    doc = manifest.params.get("resized") if manifest is not None else None
    return doc if isinstance(doc, dict) else {}


def refuse_in_bank(label: str, manifest: Manifest) -> None:
    """compose/select/eval learn on the base's architecture: a vector that adds rows cannot
    be applied to it."""
    grown = {k: v for k, v in resized_keys(manifest).items() if "added_rows" in v}
    if grown:
        k, v = next(iter(sorted(grown.items())))
        raise TvtoolError(
            f"vector {label} adds vocabulary rows ({k}: {v.get('base_rows')} -> "
            f"{v.get('finetuned_rows')}): compose, select and eval keep the base's shapes; "
            "use tvtool merge, or re-extract without --allow-resize")


def is_added(key: str, reader_keys: set[str]) -> bool:
    """Whether `key` holds the rows a resize added to another key of the same vector."""
    return key.endswith(ADDED) and key[: -len(ADDED)] in reader_keys


def shrink_problem(label: str, key: str, shape: tuple[int, ...], base: TensorMeta,
                   resized: dict[str, dict[str, Any]]) -> str | None:
    """A one-line reason when a vector's resized `key` shrinks the base's vocabulary."""
    stem = next((k for k in resized if key == k or key.endswith("." + k) or k.endswith(
        "." + key)), None)
    if stem is None or not shape or shape[0] >= base.shape[0]:
        return None
    return (f"{label}: {key} has {shape[0]} rows, the base {base.shape[0]} (the fine-tune "
            "shrank the vocabulary): merge only grows vocabularies")


def plan_grown(terms: list[PlannedTerm], metas: dict[str, TensorMeta]) -> dict[str, Grown]:
    """{key: Grown} from the terms' added rows (`PlannedTerm.added`: key -> (added key, rows));
    refuses negated terms that add rows and vectors that disagree on a key's new row count."""
    grown: dict[str, Grown] = {}
    for i, t in enumerate(terms):
        for key, (added, n_added) in sorted(t.added.items()):
            if t.weight < 0:
                raise TvtoolError(
                    f"{t.label} adds {n_added} vocabulary row(s) to {key} and is negated: "
                    "added rows have no base to subtract from (re-extract it without "
                    "--allow-resize, or merge it with a positive weight)")
            base_rows = metas[key].shape[0]
            g = grown.setdefault(key, Grown(base_rows, base_rows + n_added))
            if g.rows != base_rows + n_added:
                raise TvtoolError(
                    f"vectors grow {key} to different sizes ({g.rows} and "
                    f"{base_rows + n_added} rows): tvtool matches added rows by position, "
                    "so merge vectors of one tokenizer together")
            g.sources.append((i, added))
    return grown


def grown_specs(specs: list[TensorSpec], grown: dict[str, Grown]) -> list[TensorSpec]:
    return [replace(s, shape=(grown[s.name].rows, *s.shape[1:])) if s.name in grown else s
            for s in specs]


def pieces(inputs: MergeInputs, grown: dict[str, Grown], spec: TensorSpec) -> Iterator[
        torch.Tensor]:
    """The output pieces of `spec`: the merged base rows, then (a grown key) the added rows."""
    g = grown.get(spec.name)
    if g is None:
        yield from inputs.pieces(spec)
        return
    yield from inputs.pieces(replace(spec, shape=(g.base_rows, *spec.shape[1:])))
    total: torch.Tensor | None = None
    for i, added in g.sources:
        rows = inputs.vecs[i].get(added).to(torch.float32)
        total = rows.clone() if total is None else total.add_(rows)
    assert total is not None
    yield total.div_(len(g.sources)).reshape(-1)


def hf_config(base: Path, layout: OutputLayout, grown: dict[str, Grown],
              metas: dict[str, TensorMeta]) -> list[str]:
    """For an HF folder output: the base's ``config.json`` with ``vocab_size`` (top level or
    a nested ``*_config``) set to the grown row count, queued in `layout.rewrites`; returns
    the notes to show. Refuses when the folder could not be consistent."""
    if not grown or layout.folder is None:
        return []
    sizes = {(g.base_rows, g.rows) for g in grown.values()}
    if len(sizes) > 1:
        raise TvtoolError(
            "the grown tensors disagree on the vocabulary size ("
            + few([f"{k}: {g.base_rows} -> {g.rows}" for k, g in grown.items()], 3)
            + "): an HF folder needs one vocab_size; write --out FILE.safetensors")
    old, new = next(iter(sizes))
    width = {tuple(metas[k].shape[1:]) for k in grown}
    stale = [k for k, m in metas.items() if k not in grown and len(m.shape) == 2
             and m.shape[0] == old and tuple(m.shape[1:]) in width
             and k.endswith(TIED_SUFFIXES)]
    if stale:
        raise TvtoolError(
            f"{few(stale, 2)} keeps {old} rows while {few(sorted(grown), 2)} grows to {new}: "
            "the folder would not load (extract the fine-tune with --allow-resize and no "
            "filter that leaves it out)")
    path = base / "config.json"
    doc = json.loads(path.read_text())
    changed = _set_vocab(doc, old, new)
    if not changed:
        raise TvtoolError(
            f"{path} has no vocab_size of {old} (the base's rows of {few(sorted(grown), 1)}): "
            "cannot write a config for the grown vocabulary; write --out FILE.safetensors")
    layout.rewrites["config.json"] = (json.dumps(doc, indent=2) + "\n").encode()
    return [f"the vocabulary grows from {old} to {new} rows ({', '.join(sorted(grown))}): "
            f"config.json's {', '.join(changed)} set to {new}; the tokenizer files copied are "
            "the base's: copy the fine-tune's (with the added tokens) into the output folder"]


def _set_vocab(doc: dict, old: int, new: int, where: str = "") -> list[str]:
    changed = []
    for k, v in doc.items():
        if k == "vocab_size" and v == old:
            doc[k] = new
            changed.append(where + k)
        elif isinstance(v, dict) and k.endswith("_config"):
            changed += _set_vocab(v, old, new, f"{where}{k}.")
    return changed
