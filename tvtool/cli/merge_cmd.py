"""`tvtool merge` (write a model from a base and task vectors) and `tvtool provenance`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from tvtool.cli.options import (
    DryRunOpt,
    DtypeOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
    complete_names,
    open_store,
)


class MethodName(str, Enum):
    sum = "sum"
    ties = "ties"
    dare = "dare"
    magnitude = "magnitude"
    mask = "mask"


class Scope(str, Enum):
    global_ = "global"
    tensor = "tensor"


class Then(str, Enum):
    sum = "sum"
    ties = "ties"


def split_terms(args: list[str], arity: dict[str, int]) -> list[str]:
    """Move every TERM behind `--` so that `-mnist:0.5` is a term, not an option: a token that
    starts with `-` and is not one of this command's options (or their values) is a term."""
    opts: list[str] = []
    terms: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0] if a.startswith("--") else a
        if a == "--":
            terms += args[i + 1 :]
            break
        if name in arity:
            n = 0 if "=" in a and a.startswith("--") else arity[name]
            opts += args[i : i + 1 + n]
            i += n
        elif a.startswith("--") or not a.startswith("-") or a == "-":
            (opts if a.startswith("--") else terms).append(a)
        else:
            terms.append(a)  # -VECTOR[:WEIGHT]
        i += 1
    return [*opts, "--", *terms] if terms else opts


class TermsCommand(TyperCommand):
    """A command whose positional TERMs may start with `-` (negation)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        arity: dict[str, int] = {}
        for p in self.get_params(ctx):
            if getattr(p, "param_type_name", "") == "option":
                n = 0 if p.is_flag or p.count else p.nargs
                for opt in [*p.opts, *p.secondary_opts]:
                    arity[opt] = n
        return super().parse_args(ctx, split_terms(list(args), arity))


TermsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="TERM",
        help="VECTOR[:WEIGHT]: a ref, digest or prefix, optionally with a weight "
        "(cars:0.3); a leading '-' negates (-mnist:0.5). A term without a weight takes --scale.",
        autocompletion=complete_names,
        show_default=False,
    ),
]
_HELP_PARAGRAPHS = [
    "Write BASE + task vectors as a new safetensors checkpoint, streamed tensor by tensor.",
    "[b]Scale rule:[/b] a TERM without a weight gets --scale, whose default is 1.0 for one "
    "vector and 0.3 for several (task arithmetic). For ties (and dare --then ties) term weights "
    "multiply the vectors before trimming and the merged delta is multiplied by --scale, "
    "default 1.0.",
    "[b]Methods:[/b] sum: base + sum of weighted vectors. ties: trim each vector to its top "
    "--density by |tau|, elect a sign per entry (sign of the sum), average the agreeing entries. "
    "dare: drop each entry with probability --drop and rescale by 1/(1-p) (seeded per vector "
    "and tensor name), then --then sum|ties. magnitude: keep each vector's top --density by "
    "|tau|, then sum. mask: apply the importance masks written by `select` (--mask, matched to "
    "terms by vector; tensors a mask lacks are dropped), then sum; a negative weight forgets. "
    "--coefs: learned coefficients from `compose` (one per vector per block or partition); the "
    "vectors then come from the coefficients object.",
    "[b]Top-k:[/b] exactly round(density*N) entries; among equal magnitudes the earlier tensor "
    "(sorted names), then the lower index, wins. --ties-scope global (the TIES paper's, default) "
    "finds each vector's exact threshold with two extra streamed reads of it (a histogram of "
    "float bits, then of the one bucket holding the threshold): about 3x the vector reads of "
    "sum, memory still about one tensor.",
    "Tensors no vector touches are copied bit for bit. Peak memory is about one tensor times the "
    "number of vectors. The output's __metadata__ records the recipe (`tvtool provenance OUT`); "
    "it is also stored as a `merge` object whose digest is printed, and --recipe DIGEST rebuilds "
    "the same file from the store and the same base.",
    "[b]Shards:[/b] --shard-size 5GB writes STEM-00001-of-0000N.safetensors beside --out plus "
    "STEM.safetensors.index.json (STEM: the name of --out without .safetensors); a model that "
    "fits in one shard is written to --out alone.",
]
HELP = "\n\n".join(_HELP_PARAGRAPHS)


def merge(
    base: Annotated[Path, typer.Option("--base", help="The pre-trained checkpoint.",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file "
                                      "(a directory: DIR/model.safetensors).",
                                      show_default=False)],
    terms: TermsArg = None,
    method: Annotated[MethodName, typer.Option("--method", help="Merge method.")] = MethodName.sum,
    scale: Annotated[float | None, typer.Option(
        "--scale", help="Weight of terms without one (sum); multiplier of the merged delta "
        "(ties). Default: see the scale rule above.", show_default=False)] = None,
    density: Annotated[float, typer.Option(
        "--density", help="ties/magnitude: fraction of each vector kept.")] = 0.2,
    ties_scope: Annotated[Scope, typer.Option(
        "--ties-scope", help="Top-k over the whole vector (global) or per tensor."
    )] = Scope.global_,
    drop: Annotated[float, typer.Option(
        "--drop", help="dare: drop probability p (the DARE paper's 0.9 by default).")] = 0.9,
    then: Annotated[Then, typer.Option("--then", help="dare: merge the rescaled vectors with "
                                       "sum or ties.")] = Then.sum,
    seed: SeedOpt = 0,
    coefs: Annotated[str | None, typer.Option(
        "--coefs", help="Learned coefficients object (from compose).",
        autocompletion=complete_names, show_default=False)] = None,
    mask: Annotated[list[str] | None, typer.Option(
        "--mask", help="mask: an importance mask object (repeatable, one per term).",
        autocompletion=complete_names, show_default=False)] = None,
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="Rebuild a stored merge (its digest) on the same --base; no TERMs.",
        autocompletion=complete_names, show_default=False)] = None,
    dtype: DtypeOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Skip (with a warning) vector tensors that the base lacks or "
        "whose shapes differ, instead of failing.")] = False,
    shard_size: Annotated[str | None, typer.Option(
        "--shard-size", help="Write HF-style shards of at most this size (e.g. 5GB).",
        show_default=False)] = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    store: StoreOpt = None,
) -> None:
    from tvtool.cli.output import emit_json, emit_line, progress, warn
    from tvtool.errors import TvtoolError
    from tvtool.vectors.merge import execute_merge, plan_merge
    from tvtool.vectors.recipe import MergeRequest, request_from_recipe
    from tvtool.vectors.terms import parse_size, parse_terms

    st = open_store(store)
    if recipe:
        if terms or coefs or mask:
            raise TvtoolError("--recipe rebuilds a stored merge: give no TERMs, --coefs or --mask")
        req = request_from_recipe(st, recipe, base, out, force=force)
    else:
        req = MergeRequest(
            base=base, out=out, terms=parse_terms(terms or []), method=method.value, scale=scale,
            density=density, scope=ties_scope.value, drop=drop, then=then.value, seed=seed,
            coefs=coefs, masks=mask or [], dtype=dtype, include=include or [],
            exclude=exclude or [], allow_missing=allow_missing, force=force,
            shard_size=parse_size(shard_size) if shard_size else None,
        )
    plan = plan_merge(st, req, hash_base=dry_run)  # a real run hashes the base while merging
    for s in plan.skipped:
        warn(f"skipped {s}")
    if plan.image_tower_only and not quiet:
        from tvtool.cli.output import info

        info(
            f"{req.base} is an image tower only (no text transformer): the merged file holds "
            "what the base had; evaluate it with --head FILE or --text-tower"
        )
    if dry_run:
        _warn_foreign(plan)
        doc = _plan_doc(st, plan)
        if json_out:
            emit_json({"dry_run": True, **doc})
        elif not quiet:
            _render(doc)
        return
    with progress() as bar:
        task = bar.add_task("merge", total=None)
        result = execute_merge(
            st, plan, lambda stage, done, total: bar.update(
                task, description=stage, completed=done, total=total),
        )
    _warn_foreign(plan)
    doc = {**_plan_doc(st, plan), "seconds": round(result.seconds, 3)}
    if json_out:
        emit_json({"dry_run": False, **doc})
        return
    if not quiet:
        _render(doc)
    emit_line(result.digest)


def _warn_foreign(plan: Any) -> None:
    from tvtool.cli.output import warn

    for t in plan.foreign_terms():
        warn(f"{t.label} was extracted from another base file (sha256 {t.extracted_from[:12]}) "
             f"than {plan.request.base} ({plan.fingerprint[:12]})")


def _plan_doc(st: Any, plan: Any) -> dict[str, Any]:
    return {
        "merge": plan.digest,
        "base": {"path": str(plan.request.base), "fingerprint": plan.recipe["base"]},
        "method": plan.params.method,
        "params": plan.recipe["params"],
        "terms": [
            {"term": t.label, "vector": t.digest, "name": st.display_name(t.digest),
             "weight": t.weight, "mask": t.mask, "tensors": len(t.keys), "numel": t.numel,
             "extracted_from": t.extracted_from}
            for t in plan.terms
        ],
        "coefs": plan.coefs,
        "tensors": {"total": len(plan.specs), "touched": len(plan.touched),
                    "copied": len(plan.specs) - len(plan.touched)},
        "files": [str(f) for f, _ in plan.files],
        "index": str(plan.index) if plan.index else None,
        "size": plan.total_size,
        "skipped": plan.skipped,
    }


def _render(doc: dict[str, Any]) -> None:
    from rich.padding import Padding
    from rich.table import Table

    from tvtool.cli.output import err, human_bytes

    prm = doc["params"]
    extra = ", ".join(f"{k} {prm[k]}" for k in ("density", "scope", "drop", "then", "seed")
                      if k in prm)
    err.print(f"Merge [bold]{doc['merge'][:12]}[/bold]: {doc['method']}, scale {prm['scale']:g}"
              + (f", {extra}" if extra else ""), soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    for col in ("term", "vector", "weight", "mask", "tensors"):
        table.add_column(col, justify="right" if col in ("weight", "tensors") else "left")
    for t in doc["terms"]:
        table.add_row(t["term"], t["vector"][:12], f"{t['weight']:g}", (t["mask"] or "-")[:12],
                      str(t["tensors"]))
    err.print(Padding(table, (0, 0, 0, 2), expand=False))
    n = doc["tensors"]
    rows = [("base", f"{doc['base']['path']}  sha256 {doc['base']['fingerprint'][:12]}"),
            ("tensors", f"{n['total']} ({n['touched']} changed, {n['copied']} copied)")]
    if doc["coefs"]:
        rows.append(("coefs", doc["coefs"][:12]))
    files = doc["files"] + ([doc["index"]] if doc["index"] else [])
    done = f"written in {doc['seconds']:.1f} s" if "seconds" in doc else "dry run: not written"
    rows.append(("output", f"{', '.join(files)} ({human_bytes(doc['size'])}), {done}"))
    for label, text in rows:
        err.print(f"  {label:<8} {text}", soft_wrap=True, markup=False, highlight=False)


def provenance(
    path: Annotated[Path, typer.Argument(help="A merged .safetensors file, a shard, its "
                                         "index.json or a directory.", show_default=False,
                                         metavar="PATH")],
    json_out: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Print the recipe that `tvtool merge` recorded in a checkpoint's metadata."""
    import json

    from tvtool.cli.output import emit_json, emit_line, err, warn
    from tvtool.vectors.recipe import decode_provenance, read_metadata

    file, meta = read_metadata(path)
    prov = decode_provenance(meta)
    if json_out:
        emit_json({"path": str(file), "tvtool": bool(prov), "provenance": prov,
                   "metadata": meta})
        return
    if not prov:
        warn(f"{file} has no tvtool provenance (not written by tvtool merge)")
        for k, v in sorted(meta.items()):
            err.print(f"  {k:<18} {v}", soft_wrap=True, markup=False, highlight=False)
        return
    st = open_store(store)

    def named(d: str) -> str:
        try:
            name = st.display_name(d)
        except Exception:
            name = d[:12]
        return d[:12] if name == d[:12] else f"{name} ({d[:12]})"

    rows = [(k, str(prov[k])) for k in ("version", "method", "base_fingerprint") if k in prov]
    params = prov.get("params", {})
    rows.append(("params", ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())))
    weights = prov.get("weights", [])
    masks = prov.get("masks") or [None] * len(prov.get("vectors", []))
    for i, d in enumerate(prov.get("vectors", [])):
        w = f"{weights[i]:g}" if i < len(weights) else "?"
        m = f"  mask {named(masks[i])}" if i < len(masks) and masks[i] else ""
        rows.append((f"vector {i + 1}", f"{named(d)}  weight {w}{m}"))
    if prov.get("coefs"):
        rows.append(("coefs", named(prov["coefs"])))
    rows.append(("merge", str(prov.get("merge", "?"))))
    err.print(f"[bold]{file}[/bold]", soft_wrap=True)
    for label, text in rows:
        err.print(f"  {label:<16} {text}", soft_wrap=True, markup=False, highlight=False)
    if prov.get("merge"):
        emit_line(prov["merge"])


def register(app: typer.Typer) -> None:
    app.command("merge", cls=TermsCommand, help=HELP)(merge)
    app.command("provenance")(provenance)
