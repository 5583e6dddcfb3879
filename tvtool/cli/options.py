"""Shared `Annotated` option aliases, so every command spells the same option the same way, and
`with_options`, which adds a group of them to a command at once (compose, select and eval share
the model, data, learning and output groups instead of restating them)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tvtool.store.store import Store


def complete_refs(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of stored objects: ref names, and digest prefixes (12 hex) once two or
    more hex characters are typed. Reads only the refs and manifest file names (torch-free)."""
    try:
        store = Store(ctx.params.get("store") if ctx is not None else None)
        out = [n for n in store.refs() if n.startswith(incomplete)]
        raw = incomplete.lower()
        if len(raw) >= 2 and all(c in "0123456789abcdef" for c in raw):
            fan = store.objects_dir / raw[:2]
            if fan.is_dir():
                out += sorted((raw[:2] + p.name[:-5])[:12] for p in fan.glob(raw[2:] + "*.json"))
        return out
    except Exception:
        return []


complete_names = complete_refs  # the name command modules import


def open_store(path: Path | None) -> Store:
    return Store(path)


StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Store root. Default: $TVTOOL_HOME, else $XDG_CACHE_HOME/tvtool, "
        "else ~/.cache/tvtool.",
        show_default=False,
        file_okay=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only the resulting digest or name on stdout.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Say what would happen; change nothing.")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", "-n", help="Tag the result with this ref name (e.g. vit-b-32/cars)."),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", help="Precision: fp32, fp16 or bf16.", show_default=False),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        help="Only tensors whose name matches this regex (repeatable).",
        show_default=False,
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Skip tensors whose name matches this regex (repeatable).",
        show_default=False,
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (auto picks CUDA when present).")
]
VectorsArg = Annotated[
    list[str],
    typer.Argument(
        help="Task vectors: ref names, digests or unique digest prefixes.",
        autocompletion=complete_names,
        show_default=False,
    ),
]


F = TypeVar("F", bound=Callable[..., Any])


def option(name: str, alias: Any, default: Any = None) -> inspect.Parameter:
    """Parameter `name` of a command declared by an `Annotated` alias, for `with_options`."""
    return inspect.Parameter(name, _KEYWORD, default=default, annotation=alias)


_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def with_options(
    *groups: Sequence[inspect.Parameter], after: str | None = None
) -> Callable[[F], F]:
    """Add the parameters of `groups` to a command's signature as typer reads it (after the
    parameter `after`, else at the end); the command receives them in its ``**kwargs``."""

    def add(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = next((i + 1 for i, p in enumerate(own) if p.name == after), len(own))
        kind = own[at - 1].kind if at else inspect.Parameter.POSITIONAL_OR_KEYWORD
        extra = [p.replace(kind=kind) for g in groups for p in g]
        params = [*own[:at], *extra, *own[at:]]
        func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in params}
        return func

    return add


def output_options(named: bool = True) -> list[inspect.Parameter]:
    """--name and --force (for a command that stores a result), --store, --json, -q."""
    tag = [option("name", NameOpt), option("force", ForceOpt, False)] if named else []
    return [*tag, option("store", StoreOpt), option("json_out", JsonOpt, False),
            option("quiet", QuietOpt, False)]
