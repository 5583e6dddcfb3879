"""`tvtool merge` (write a model from a base and task vectors) and `tvtool provenance`.

The method choices and every method parameter flag are built from the registry
(`tvtool.vectors.methods`): a flag is given to the method's Params only when set, so defaults
live in one place.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from tvtool.cli.merge_report import MergeReport, ProvenanceReport, merge_report
from tvtool.cli.model_options import OtherBaseOpt
from tvtool.cli.options import (
    DryRunOpt,
    DtypeOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    NameOpt,
    QuietOpt,
    StoreOpt,
    complete_names,
    open_store,
    with_options,
)
from tvtool.cli.terms_arg import TermsCommand, split_terms
from tvtool.vectors.methods import METHODS, cli_flag, param_fields

__all__ = ["TermsCommand", "register", "split_terms"]
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


def _method_lines() -> str:
    return " ".join(f"{name}: {m.summary}" for name, m in METHODS.items())


_HELP_PARAGRAPHS = [
    "Write BASE + task vectors as a new safetensors checkpoint, streamed tensor by tensor. A "
    "TERM is a stored vector or a fine-tuned checkpoint (a file or folder: its task vector "
    "against --base is computed on the fly, nothing is stored).",
    "[b]Scale rule:[/b] a TERM without a weight gets --scale, whose default is 1.0 for one "
    "vector and 0.3 for several (task arithmetic). For the other methods (ties, dare --then "
    "ties, della, model_stock, slerp) term weights multiply the vectors and the merged delta is "
    "multiplied by --scale, default 1.0.",
    "[b]Methods:[/b] " + _method_lines() + " --coefs: learned coefficients from `compose` (one "
    "per vector per block or partition); the vectors then come from the coefficients object.",
    "[b]Top-k:[/b] exactly int(density*N) entries; among equal magnitudes the earlier tensor "
    "(sorted names), then the lower index, wins. --ties-scope global (the TIES paper's, default) "
    "finds each vector's exact threshold with two extra streamed reads of it (a histogram of "
    "float bits, then of the one bucket holding the threshold): about 3x the vector reads of "
    "sum, memory still about one tensor.",
    "Tensors no vector touches are copied bit for bit. Peak memory is about one tensor times the "
    "number of vectors. The output's __metadata__ records the recipe (`tvtool provenance OUT`); "
    "it is also stored as a `merge` object whose digest is printed (tagged with --name), and "
    "--recipe DIGEST rebuilds the same file from the store and the same base. --config FILE "
    "reads base, method, params and terms from a mergekit-style YAML or JSON file.",
    "[b]Shards:[/b] --shard-size 5GB writes STEM-00001-of-0000N.safetensors beside --out plus "
    "STEM.safetensors.index.json (STEM: the name of --out without .safetensors); a model that "
    "fits in one shard is written to --out alone.",
]
HELP = "\n\n".join(_HELP_PARAGRAPHS)
PREFIX = "p_"  # python names of the generated method-parameter options


def _plain(annotation: Any) -> tuple[Any, list[str] | None]:
    """(python type, choices) of a Params field annotation, None stripped."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _plain(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    return annotation, None


def method_options() -> dict[str, dict[str, Any]]:
    """One option per distinct flag over every method's Params: flag -> field, type, choices,
    help, and the methods that use it (with their defaults)."""
    out: dict[str, dict[str, Any]] = {}
    for m in METHODS.values():
        for name, info in param_fields(m).items():
            flag = cli_flag(name, info)
            kind, choices = _plain(info.annotation)
            entry = out.setdefault(flag, {"field": name, "type": kind, "choices": choices,
                                          "help": info.description or name, "uses": []})
            if (entry["field"], entry["type"], entry["choices"]) != (name, kind, choices):
                raise TypeError(f"{flag}: methods disagree on its field or type")
            entry["uses"].append((m.name, info.default))
    return out


def choice(name: str, values: list[str]) -> type[enum.Enum]:
    """A str Enum of `values` (how typer spells a choice)."""
    return enum.Enum(name.title(), [(v, v) for v in values], type=str)  # type: ignore[return-value]


MethodChoice = choice("method", list(METHODS))


def _value(v: Any) -> Any:
    return v.value if isinstance(v, enum.Enum) else v


def _option_parameters() -> list[inspect.Parameter]:
    params = []
    for flag, o in method_options().items():
        uses = ", ".join(f"{n} {'off' if d is None else str(d).lower()}" for n, d in o["uses"])
        text = f"{o['help']} [default: {uses}]"
        decl = f"{flag}/--no-{flag[2:]}" if o["type"] is bool else flag
        kind = choice(o["field"], o["choices"]) if o["choices"] else o["type"]
        option = typer.Option(decl, help=text, show_default=False)
        params.append(inspect.Parameter(
            PREFIX + o["field"], inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[kind | None, option],
        ))
    return params


TermsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="TERM",
        help="VECTOR[:WEIGHT]: a ref, digest, prefix or checkpoint path, optionally with a "
        "weight (cars:0.3); a leading '-' negates (-mnist:0.5). A term without a weight takes "
        "--scale.",
        autocompletion=complete_names,
        show_default=False,
    ),
]


def merge(
    terms: TermsArg = None,
    base: Annotated[Path | None, typer.Option("--base", help="The pre-trained checkpoint "
                                              "(required unless --config gives it).",
                                              show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .safetensors file "
                                             "(a directory: DIR/model.safetensors).",
                                             show_default=False)] = None,
    method: Annotated[MethodChoice | None, typer.Option(  # type: ignore[valid-type]
        "--method", help="Merge method (default sum).", show_default=False)] = None,
    scale: Annotated[float | None, typer.Option(
        "--scale", help="Weight of terms without one (sum); multiplier of the merged delta "
        "(the other methods). Default: see the scale rule above.", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="A mergekit-style YAML/JSON recipe file (base, method, params, terms).",
        show_default=False, dir_okay=False)] = None,
    coefs: Annotated[str | None, typer.Option(
        "--coefs", help="Learned coefficients object (from compose).",
        autocompletion=complete_names, show_default=False)] = None,
    mask: Annotated[list[str] | None, typer.Option(
        "--mask", help="mask: an importance mask object (repeatable, one per term).",
        autocompletion=complete_names, show_default=False)] = None,
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="Rebuild a stored merge (its digest) on the same --base; no TERMs.",
        autocompletion=complete_names, show_default=False)] = None,
    name: NameOpt = None,
    dtype: DtypeOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Skip (with a warning) vector tensors that the base lacks or "
        "whose shapes differ, instead of failing.")] = False,
    allow_other_base: OtherBaseOpt = False,
    shard_size: Annotated[str | None, typer.Option(
        "--shard-size", help="Write HF-style shards of at most this size (e.g. 5GB).",
        show_default=False)] = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    store: StoreOpt = None,
    **method_params: Any,
) -> None:
    from tvtool.cli.output import emit_json, emit_line, progress, warn
    from tvtool.errors import TvtoolError
    from tvtool.vectors.merge import execute_merge, plan_merge
    from tvtool.vectors.recipe import merge_request, request_from_recipe
    from tvtool.vectors.terms import parse_size, parse_terms

    given = {k[len(PREFIX):]: _value(v) for k, v in method_params.items() if v is not None}
    method = _value(method)
    st = open_store(store)
    cli: dict[str, Any] = {
        "base": base, "out": out, "scale": scale, "coefs": coefs, "masks": mask or None,
        "dtype": dtype, "include": include or None, "exclude": exclude or None, "name": name,
        "allow_missing": allow_missing or None, "allow_other_base": allow_other_base or None,
        "shard_size": parse_size(shard_size) if shard_size else None,
    }
    cli = {k: v for k, v in cli.items() if v is not None}
    if recipe:
        if terms or coefs or mask or config or method or given:
            raise TvtoolError("--recipe rebuilds a stored merge: give no TERMs, --config, "
                              "--method, method options, --coefs or --mask")
        if base is None or out is None:
            raise TvtoolError("--recipe needs --base and --out")
        extra = {k: cli[k] for k in ("name", "allow_other_base") if k in cli}
        req = request_from_recipe(st, recipe, base, out, force=force, **extra)
    else:
        fields: dict[str, Any] = {}
        if config is not None:
            from tvtool.vectors.merge_config import read_config

            if terms or method or given:
                raise TvtoolError("--config gives the terms and the method: give no TERMs, "
                                  "--method or method options")
            fields = read_config(config)
        else:
            fields = {"method": method or "sum", **given, "terms": parse_terms(terms or [])}
        fields.update(cli)
        for key in ("base", "out"):
            if fields.get(key) is None:
                raise TvtoolError(f"--{key} is required (on the command line or in --config)")
        req = merge_request(**fields, force=force)
    plan = plan_merge(st, req, hash_base=dry_run)  # a real run hashes the base while merging
    for s in plan.skipped:
        warn(f"skipped {s}")
    for note in plan.notes:
        warn(note)
    if plan.image_tower_only and not quiet:
        from tvtool.cli.output import info

        info(
            f"{req.base} is an image tower only (no text transformer): the merged file holds "
            "what the base had; evaluate it with --head FILE or --text-tower"
        )
    if dry_run:
        _warn_foreign(plan)
        doc = merge_report(st, plan)
        if json_out:
            emit_json(doc)
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
    doc = merge_report(st, plan, result.seconds)
    if json_out:
        emit_json(doc)
        return
    if not quiet:
        _render(doc)
    emit_line(result.digest)


with_options(_option_parameters())(merge)  # one keyword parameter per method option


def _warn_foreign(plan: Any) -> None:
    from tvtool.cli.output import warn

    for t in plan.foreign_terms():  # only with --allow-other-base: refused otherwise
        warn(f"{t.label} was extracted from another base file (sha256 {t.extracted_from[:12]}) "
             f"than {plan.request.base} ({plan.fingerprint[:12]})")


def _render(doc: MergeReport) -> None:
    from rich.padding import Padding
    from rich.table import Table

    from tvtool.cli.output import err, human_bytes

    prm = doc.params
    skip = {"scale", "dtype", "include", "exclude", "allow_missing", "shard_size"}
    extra = ", ".join(f"{k} {v}" for k, v in prm.items() if k not in skip and v is not None)
    err.print(f"Merge [bold]{doc.merge[:12]}[/bold]: {doc.method}, scale {prm['scale']:g}"
              + (f", {extra}" if extra else ""), soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    for col in ("term", "vector", "weight", "mask", "tensors"):
        table.add_column(col, justify="right" if col in ("weight", "tensors") else "left")
    for t in doc.terms:
        source = t.vector or t.fingerprint or "(checkpoint)"
        table.add_row(t.term, source[:12], f"{t.weight:g}", (t.mask or "-")[:12], str(t.tensors))
    err.print(Padding(table, (0, 0, 0, 2), expand=False))
    n = doc.tensors
    rows = [("base", f"{doc.base.path}  sha256 {(doc.base.fingerprint or '')[:12]}"),
            ("tensors", f"{n.total} ({n.touched} changed, {n.copied} copied)")]
    if doc.coefs:
        rows.append(("coefs", doc.coefs[:12]))
    files = doc.files + ([doc.index] if doc.index else [])
    done = f"written in {doc.seconds:.1f} s" if doc.seconds is not None else "dry run: not written"
    rows.append(("output", f"{', '.join(files)} ({human_bytes(doc.size)}), {done}"))
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
        emit_json(ProvenanceReport(path=str(file), tvtool=bool(prov), provenance=prov,
                                   metadata=meta))
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
