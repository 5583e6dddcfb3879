"""`tvtool store ...`: list, show, tag, remove, verify, gc, export and import stored objects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from tvtool.cli.group import new_app
from tvtool.cli.options import (
    DryRunOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    StoreOpt,
    YesOpt,
    complete_refs,
)
from tvtool.cli.store_render import count, render_manifest, short_dtype, when
from tvtool.errors import IntegrityError, TvtoolError
from tvtool.store.manifest import ObjectKind

store_app = new_app(
    "store",
    "The local content-addressed store: list, show, tag, remove, verify, gc, export, import.",
)


RefArg = Annotated[
    str,
    typer.Argument(help="A ref name, a digest or a unique digest prefix (8+ hex).",
                   autocompletion=complete_refs, show_default=False),
]
RefsArg = Annotated[
    list[str],
    typer.Argument(help="Ref names (or digests / unique prefixes).", autocompletion=complete_refs,
                   show_default=False),
]


def _duration(value: str) -> str:
    from tvtool.store.maintenance import parse_duration

    try:
        parse_duration(value)
    except TvtoolError as e:
        raise typer.BadParameter(str(e)) from None
    return value


_KINDS: tuple[str, ...] = get_args(ObjectKind)


def _kind(value: str | None) -> str | None:
    if value is not None and value not in _KINDS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(_KINDS)}")
    return value


@store_app.command("ls")
def ls_cmd(
    kind: Annotated[str | None, typer.Option(
        "--kind", help="Only objects of this kind (vector, coefs, merge, ...).",
        callback=_kind, autocompletion=lambda incomplete: [k for k in _KINDS if
                                                           k.startswith(incomplete)],
        show_default=False)] = None,
    show_all: Annotated[bool, typer.Option(
        "--all", "-a", help="Also list cached zero-shot heads (kind head, refs cache/heads/...).")
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    store: StoreOpt = None,
) -> None:
    """List named and untagged objects (names, digest, kind, numel, size, dtype, created)."""
    from tvtool.cli.output import (
        Col,
        emit_json,
        emit_line,
        err,
        human_bytes,
        info,
        out,
        table,
        warn,
    )
    from tvtool.cli.store_reports import StoreListing
    from tvtool.store.maintenance import dangling_refs, list_objects
    from tvtool.store.store import Store

    st = Store(store)
    rows = list_objects(st, kind, caches=show_all)
    dangling = dangling_refs(st)
    if as_json:
        emit_json(StoreListing(store=str(st.root), objects=rows, dangling_refs=dangling))
        return
    if quiet:
        for r in rows:
            emit_line(r["names"][0] if r["names"] else r["digest"])
        return
    if not rows:
        err.print(f"no objects in store {st.root}" + (f" of kind {kind}" if kind else ""),
                  markup=False)
    else:  # data: rows on stdout (a table in a terminal, tab-separated and whole elsewhere)
        info(f"store {st.root}")
        table([Col("name"), Col("digest", digest=True), Col("kind"), Col("numel", "right"),
               Col("size", "right"), Col("dtype"), Col("created")],
              ([",".join(r["names"]) or "(untagged)", r["digest"], r["kind"], count(r["numel"]),
                human_bytes(r["size"] or 0), short_dtype(r["dtype"]),
                when(r["created"]) if r["created"] else ""] for r in rows),
              console=out)
    for n, d in dangling.items():
        warn(f"ref {n!r} points at missing object {d[:12]}")


@store_app.command("show")
def show_cmd(
    ref: RefArg,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    store: StoreOpt = None,
) -> None:
    """Show an object's manifest (and, for coefs objects, its coefficients)."""
    from tvtool.cli.output import emit_json, emit_line
    from tvtool.store.store import Store

    st = Store(store)
    digest = st.resolve(ref)
    manifest = st.manifest(digest)
    names = st.names_for(digest)
    if as_json:
        from tvtool.cli.store_reports import ShownObject

        emit_json(ShownObject(**manifest.model_dump(), names=names))
    elif quiet:
        emit_line(digest)
    else:
        render_manifest(st, manifest, names)


@store_app.command("tag")
def tag_cmd(
    digest: RefArg,
    name: Annotated[str, typer.Argument(help="The ref name to set (namespaces: vit-b-32/cars).",
                                        autocompletion=complete_refs, show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Move the name if it exists.")] = False,
    quiet: QuietOpt = False,
    store: StoreOpt = None,
) -> None:
    """Name an object (DIGEST may also be a prefix or another ref)."""
    from tvtool.cli.output import emit_line, info
    from tvtool.store.store import Store

    st = Store(store)
    target = st.resolve(digest)
    old = st.set_ref(name, target, force=force)
    if quiet:
        emit_line(name)
    elif old is not None and old != target:
        info(f"moved {name} from {old[:12]} to {target[:12]}")
    else:
        info(f"tagged {target[:12]} ({st.manifest(target).kind}) as {name}")


@store_app.command("rm")
def rm_cmd(
    names: Annotated[list[str], typer.Argument(
        help="Ref names to remove, or digests (8+ hex): a digest removes every ref naming it.",
        autocompletion=complete_refs, show_default=False)],
    yes: YesOpt = False,
    dry_run: DryRunOpt = False,
    store: StoreOpt = None,
) -> None:
    """Remove refs. The objects stay until `tvtool store gc` sweeps them.

    A digest or unique prefix (digests win over names) removes every ref that names the object;
    an object no ref names is refused (gc removes unnamed objects).
    """
    from tvtool.cli.output import info
    from tvtool.store.store import Store

    st = Store(store)
    targets: dict[str, str] = {}
    for n in names:
        targets.update(_rm_targets(st, n))
    listing = ", ".join(f"{n} ({d[:12]})" for n, d in targets.items())
    if dry_run:
        info(f"would remove {len(targets)} ref(s): {listing}")
        return
    if not yes:
        typer.confirm(f"Remove {len(targets)} ref(s): {listing}?", abort=True, err=True)
    for n in targets:
        st.remove_ref(n)
    info(f"removed {len(targets)} ref(s): {listing}; run `tvtool store gc` to free space")


def _rm_targets(st: Any, name: str) -> dict[str, str]:
    """The refs `store rm NAME` removes: NAME itself, or every ref naming a digest."""
    from tvtool.store.names import looks_like_digest

    raw = name.strip().removeprefix("sha256:").lower()
    hits = st.digests_with_prefix(raw) if looks_like_digest(name) else []
    if len(hits) > 1:
        st.resolve(name)  # raises: ambiguous
    if hits:
        naming = {n: hits[0] for n in st.names_for(hits[0])}
        if not naming:
            raise TvtoolError(
                f"no ref names object {hits[0][:12]}; unnamed objects are removed by"
                " `tvtool store gc`"
            )
        return naming
    d = st.get_ref(name)
    if d is None:
        raise TvtoolError(f"no ref named {name!r} (see `tvtool store ls`)")
    return {name: d}


@store_app.command("verify")
def verify_cmd(as_json: JsonOpt = False, store: StoreOpt = None) -> None:
    """Check every object and ref; exit 3 naming each inconsistent one.

    Re-hashes all data and checks each manifest against it (tensors, shapes, dtypes, numel),
    that every input and every ref target is present, and that reached data has a manifest.
    """
    from tvtool.cli.output import emit_json, err, progress
    from tvtool.cli.store_reports import ProblemRow, VerifyReport
    from tvtool.store.maintenance import Problem, verify
    from tvtool.store.store import Store

    st = Store(store)
    total = sum(1 for _ in st.iter_digests())
    warnings: list[Problem] = []
    with progress() as bar:
        task = bar.add_task("verifying", total=total)
        checked, problems = verify(st, on_object=lambda _d: bar.advance(task), warnings=warnings)
    by_digest = st.names_by_digest()

    def listed(items: list[Problem]) -> list[ProblemRow]:
        return [ProblemRow(digest=p.digest, names=by_digest.get(p.digest, []), problem=p.what,
                           dangling_ref=p.ref) for p in items]

    if as_json:
        emit_json(VerifyReport(store=str(st.root), checked=checked, ok=not problems,
                               problems=listed(problems), warnings=listed(warnings)))
    else:
        from tvtool.cli.output import plain

        for p, item in zip(problems, listed(problems), strict=True):
            names = f" ({', '.join(item.names)})" if item.names else ""
            label = "dangling" if p.ref else "corrupt"
            err.print(f"[red]{label}[/red] {plain(p.digest + names)}: {plain(p.what)}",
                      soft_wrap=True, highlight=False)
        for p in warnings:
            err.print(f"[yellow]warning[/yellow] {plain(p.digest[:12])}: {plain(p.what)}",
                      soft_wrap=True, highlight=False)
    if problems:
        bad = len({p.digest for p in problems if p.ref is None})
        dangling = sum(1 for p in problems if p.ref is not None)
        extra = f" and {dangling} ref(s) point at missing objects" if dangling else ""
        raise IntegrityError(
            f"{bad} of {checked} objects in {st.root} failed verification{extra}"
        )
    if not as_json:
        err.print(f"{checked} objects ok")


@store_app.command("gc")
def gc_cmd(
    dry_run: DryRunOpt = False,
    grace: Annotated[str, typer.Option("--grace", callback=_duration,
                                       help="Keep unreferenced objects younger than this "
                                            "(30s, 10m, 1h, 2d, 0).")] = "1h",
    as_json: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Sweep objects no ref reaches (nor their inputs), crashed writes and temp files."""
    from tvtool.cli.output import emit_json, human_bytes, info, warn
    from tvtool.store.maintenance import format_duration, gc, parse_duration
    from tvtool.store.store import Store

    st = Store(store)
    seconds = parse_duration(grace)
    report = gc(st, seconds, dry_run=dry_run)
    if as_json:
        from tvtool.cli.store_reports import GcReport

        emit_json(GcReport(
            store=str(st.root), dry_run=dry_run, grace_seconds=seconds, removed=report.removed,
            reclaimed_bytes=report.reclaimed_bytes, kept_recent=report.kept_recent,
            kept_damaged=report.kept_damaged, corrupt_refs=report.corrupt_refs,
            tmp_removed=report.tmp_removed,
        ))
        return
    verb = "would remove" if dry_run else "removed"
    for d in report.removed:
        info(f"{verb} {d[:12]}")
    info(f"{verb} {len(report.removed)} object(s) ({human_bytes(report.reclaimed_bytes)})"
         f" and {report.tmp_removed} temp file(s)")
    if report.kept_recent:
        info(f"kept {len(report.kept_recent)} unreferenced object(s) younger than"
             f" {format_duration(seconds)} (--grace)")
    for d in report.kept_damaged:
        warn(f"kept {d[:12]}: a ref reaches it but its manifest is missing or corrupt"
             " (see `tvtool store verify`)")
    for n in report.corrupt_refs:
        warn(f"ref {n!r} holds no digest: no object swept until it is fixed or removed"
             " (see `tvtool store verify`)")


@store_app.command("export")
def export_cmd(
    names: RefsArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle file to write.",
                                         dir_okay=False, show_default=False)],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
) -> None:
    """Write named objects and all their inputs to a self-contained bundle.

    A namespace (e.g. vit-b-32/) exports every ref under it; a digest exports an unnamed object.
    """
    from tvtool.cli.output import emit_json, human_bytes, info
    from tvtool.cli.store_reports import ExportReport
    from tvtool.store.bundle import export_bundle
    from tvtool.store.store import Store

    result = ExportReport(bundle=str(output), **export_bundle(Store(store), names, output,
                                                              force=force))
    if as_json:
        emit_json(result)
        return
    refs = ", ".join(result.refs) or "no refs"
    info(f"exported {len(result.objects)} object(s) ({refs}) to {output}"
         f" ({human_bytes(result.size)})")


@store_app.command("import")
def import_cmd(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by `tvtool store export`.",
                                           dir_okay=False, show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Move refs that exist here.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    store: StoreOpt = None,
) -> None:
    """Import a bundle: every object is verified; a corrupt bundle imports nothing (exit 3)."""
    from tvtool.cli.output import emit_json, emit_line, info
    from tvtool.cli.store_reports import ImportReport
    from tvtool.store.bundle_import import import_bundle
    from tvtool.store.store import Store

    if not bundle.is_file():
        raise TvtoolError(f"no bundle file {bundle}")
    result = ImportReport(**import_bundle(Store(store), bundle, force=force))
    if as_json:
        emit_json(result)
    elif quiet:
        for d in result.objects:
            emit_line(d)
    else:
        refs = ", ".join(result.refs) or "no refs"
        info(f"imported {len(result.objects)} object(s), {len(result.new)} new ({refs})")


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")
