"""`tvtool clean DIR...`: remove stale `.NAME.<id>.part` files that killed writers left."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvtool.cli.options import DryRunOpt, JsonOpt


def clean_cmd(
    dirs: Annotated[list[Path] | None, typer.Argument(
        help="Directories to scan (default: the current one).", metavar="DIR", show_default=False,
        file_okay=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r",
                                            help="Also scan subdirectories.")] = False,
    grace: Annotated[str, typer.Option(
        "--grace", help="Keep part files modified more recently than this (30s, 10m, 1h, 0)."
    )] = "1h",
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove stale part files (`.NAME.<8 hex>.part`) that an interrupted `merge --out` or
    `store export` left beside its output. Only tvtool's own naming is touched; files younger
    than --grace may belong to a write in progress and are kept. The store's own temp files
    are swept by `tvtool store gc`."""
    from tvtool.cli.output import emit_json, human_bytes, info
    from tvtool.store.maintenance import parse_duration
    from tvtool.store.parts import stale_parts

    seconds = parse_duration(grace)
    report = stale_parts(dirs or [Path(".")], seconds, recursive=recursive, dry_run=dry_run)
    if as_json:
        from tvtool.cli.store_reports import CleanReport

        emit_json(CleanReport(dry_run=dry_run, grace_seconds=seconds, removed=report.removed,
                              bytes=report.bytes, kept_recent=report.kept_recent))
        return
    verb = "would remove" if dry_run else "removed"
    for p in report.removed:
        info(f"{verb} {p}")
    info(f"{verb} {len(report.removed)} part file(s) ({human_bytes(report.bytes)})")
    if report.kept_recent:
        info(f"kept {len(report.kept_recent)} part file(s) younger than {grace} (--grace)")


def register(app: typer.Typer) -> None:
    app.command("clean")(clean_cmd)
