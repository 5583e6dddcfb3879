"""Line up the tensor names of a base and a fine-tune before they are compared key for key.

Three steps, each a renaming view (`keymaps.KeyMappedReader`), never a change of the files:

1. Prefixes: each reader strips the prefixes *its own* keys share (`module.`, `model.`). When
   that leaves the two key sets apart (a tied-embedding base whose every key starts with
   `model.` against a fine-tune that adds `lm_head.weight`), the prefixes shared by *both* key
   sets together are used instead, whichever matches more keys.
2. `--rename REGEX=REPL` rules, applied in order to both sides' names (`re.sub`).
3. Tied embeddings: a side without `lm_head.weight` whose `config.json` says
   `tie_word_embeddings` (transformers' default when the field is absent) reads it as its input
   embedding, when the other side has one of that shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tvtool.checkpoints.keymaps import KeyMappedReader
from tvtool.checkpoints.readers import CheckpointReader, normalise_keys
from tvtool.errors import TvtoolError, printable

HEAD = "lm_head.weight"
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def parse_renames(rules: list[str]) -> list[tuple[re.Pattern[str], str]]:
    """`REGEX=REPL` strings (split at the first `=`) as compiled substitutions."""
    out = []
    for rule in rules:
        pattern, sep, repl = rule.partition("=")
        if not sep or not pattern:
            raise TvtoolError(f"--rename {printable(rule)!r}: expected REGEX=REPL")
        try:
            out.append((re.compile(pattern), repl))
        except re.error as e:
            raise TvtoolError(f"--rename {printable(rule)!r}: invalid regex ({e})") from None
    return out


def _raw_names(reader: CheckpointReader) -> dict[str, str]:
    """original key -> the reader's key."""
    names = getattr(reader, "_names", {})
    return {raw: key for key, raw in names.items()}


def _align_prefixes(
    base: CheckpointReader, ft: CheckpointReader
) -> tuple[CheckpointReader, CheckpointReader]:
    bk, fk = set(base.keys()), set(ft.keys())
    if bk == fk:
        return base, ft
    braw, fraw = _raw_names(base), _raw_names(ft)
    union = normalise_keys(sorted(set(braw) | set(fraw)))  # new name -> raw
    back = {raw: new for new, raw in union.items()}
    bnew = {back[r]: k for r, k in braw.items()}
    fnew = {back[r]: k for r, k in fraw.items()}
    if len(set(bnew) & set(fnew)) > len(bk & fk):
        return KeyMappedReader(base, bnew), KeyMappedReader(ft, fnew)
    return base, ft


def _rename(reader: CheckpointReader, rules: list[tuple[re.Pattern[str], str]],
            side: str) -> CheckpointReader:
    names: dict[str, str] = {}
    for key in reader.keys():
        new = key
        for pattern, repl in rules:
            try:
                new = pattern.sub(repl, new)
            except (re.error, IndexError) as e:
                raise TvtoolError(f"--rename: {e}") from None
        if new in names:
            raise TvtoolError(
                f"--rename maps {names[new]!r} and {key!r} of the {side} to one name {new!r}"
            )
        names[new] = key
    return KeyMappedReader(reader, names)


def config_of(reader: CheckpointReader) -> dict:
    """The `config.json` beside a checkpoint (in its folder), or {}."""
    path = Path(reader.path)
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file() or cfg.stat().st_size > (1 << 20):
        return {}
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _tie(lacking: CheckpointReader, other: CheckpointReader) -> CheckpointReader | None:
    keys = lacking.keys()
    head = next((k for k in other.keys() if k == HEAD or k.endswith("." + HEAD)), None)
    if head is None or head in keys:
        return None
    cfg = config_of(lacking)
    if not cfg or not cfg.get("tie_word_embeddings", True):
        return None
    emb = [k for k in keys if k.endswith(_EMBEDDINGS)]
    if len(emb) != 1 or lacking.meta(emb[0]).shape != other.meta(head).shape:
        return None
    return KeyMappedReader(lacking, {**{k: k for k in keys}, head: emb[0]})


def pair_readers(
    base: CheckpointReader, ft: CheckpointReader, renames: list[str] | None = None
) -> tuple[CheckpointReader, CheckpointReader, list[str]]:
    """(base view, fine-tune view, notes for the user) with names lined up (module doc)."""
    notes: list[str] = []
    base, ft = _align_prefixes(base, ft)
    rules = parse_renames(renames or [])
    if rules:
        base, ft = _rename(base, rules, "base"), _rename(ft, rules, "fine-tuned model")
    tied = _tie(base, ft)
    if tied is not None:
        base = tied
        notes.append(f"the base ties {HEAD} to its input embedding (config.json): the "
                     "fine-tune's head is compared with the base's embedding")
    else:
        tied = _tie(ft, base)
        if tied is not None:
            ft = tied
            notes.append(f"the fine-tune ties {HEAD} to its input embedding (config.json)")
    return base, ft, notes
