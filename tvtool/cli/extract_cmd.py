"""`tvtool extract BASE FINETUNED`: store `finetuned - base` as a task vector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvtool.cli.options import (
    ExcludeOpt,
    IncludeOpt,
    JsonOpt,
    NameOpt,
    QuietOpt,
    StoreOpt,
    open_store,
)

PresetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--preset",
        metavar="NAME",
        help="Named selection (repeatable): visual (image tower of an open_clip model), "
        "attn (attention q/k/v/out projections only).",
        show_default=False,
    ),
]
StorageDtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Stored precision: fp32 (default, exact), fp16 or bf16 (the largest rounding "
        "error is reported).",
    ),
]
AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite", help="Store differences containing NaN/Inf (refused by default)."
    ),
]


BaseArg = Annotated[
    Path,
    typer.Argument(
        help="Pre-trained checkpoint (file, shard index or directory).",
        show_default=False,
        metavar="BASE",
    ),
]
FinetunedArg = Annotated[
    Path | None,
    typer.Argument(
        help="Fine-tuned checkpoint of the same model (not with --lora).",
        show_default=False,
        metavar="FINETUNED",
    ),
]
LoraOpt = Annotated[
    Path | None,
    typer.Option(
        "--lora",
        metavar="ADAPTER_DIR",
        help="A PEFT LoRA adapter of BASE (adapter_config.json + adapter_model.safetensors): "
        "stored factored (A, B, scale per tensor), not dense.",
        show_default=False,
        file_okay=False,
    ),
]
AllowResizeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-resize",
        help="Accept a resized vocabulary (first dimension differs): the shared rows give the "
        "vector, rows only the fine-tune has are stored whole as KEY.added_rows (recorded in "
        "the manifest's params.resized).",
    ),
]
RenameOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rename",
        metavar="REGEX=REPL",
        help="Rename tensor keys of both checkpoints before matching them (repeatable, applied "
        "in order, re.sub syntax: 'encoder\\.(\\d+)=layers.\\1').",
        show_default=False,
    ),
]
MoveNameOpt = Annotated[
    bool, typer.Option("--force", help="Move --name if it already points at another object.")
]


def extract(
    base: BaseArg,
    finetuned: FinetunedArg = None,
    lora: LoraOpt = None,
    name: NameOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    preset: PresetOpt = None,
    dtype: StorageDtypeOpt = "fp32",
    allow_nonfinite: AllowNonfiniteOpt = False,
    rename: RenameOpt = None,
    allow_resize: AllowResizeOpt = False,
    force: MoveNameOpt = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Store the task vector FINETUNED - BASE (read tensor by tensor) and print its digest.

    Reads safetensors (a file, a shard index or a directory of shards), torch state dicts
    (one file, or pytorch_model-*.bin shards with their index) and pickled nn.Module
    checkpoints (restricted unpickler: pickled code never runs). Non-float tensors are
    skipped and reported, also when only one side has them (position_ids). A base without
    lm_head.weight whose config.json ties it to the input embedding is matched as such.
    The same pair twice gives the same digest.
    """
    from tvtool.checkpoints.writer import parse_dtype
    from tvtool.cli.output import emit_json, emit_line, info, progress
    from tvtool.errors import TvtoolError
    from tvtool.vectors.extract import extract_vector
    from tvtool.vectors.filters import TensorFilter

    if (finetuned is None) == (lora is None):
        raise TvtoolError("give FINETUNED or --lora ADAPTER_DIR (exactly one)")
    keep = TensorFilter(include=include or [], exclude=exclude or [], presets=preset or [])
    storage = parse_dtype(dtype)
    st = open_store(store)
    if lora is not None:
        from tvtool.vectors.lora import extract_lora

        result = extract_lora(
            st, base, lora, keep=keep, dtype=storage, name=name, force=force
        )
        finetuned = lora
    else:
        with progress() as bar:
            task = bar.add_task("extracting", total=None)
            result = extract_vector(
                st, base, finetuned, keep=keep, dtype=storage, allow_nonfinite=allow_nonfinite,
                name=name, force=force, renames=rename or [], allow_resize=allow_resize,
                on_start=lambda n: bar.update(task, total=n),
                on_tensor=lambda k: bar.advance(task),
                on_note=info,
            )
    if json_out:
        from tvtool.cli.store_reports import Extracted

        emit_json(Extracted(**result.manifest.model_dump(), name=name,
                            deduplicated=result.deduplicated))
        return
    if not quiet:
        _summary(result, base, finetuned)
    emit_line(result.digest)


def _summary(result, base: Path, finetuned: Path) -> None:
    from tvtool.cli.output import err, human_bytes, warn

    m = result.manifest
    p = m.params
    title = f"[bold]{m.digest[:12]}[/bold]" + (f" ({result.name})" if result.name else "")
    verb = "already stored" if result.deduplicated else "stored"
    err.print(f"Task vector {title} {verb}", soft_wrap=True)
    source = p.get("finetuned") or p["lora"]
    rows = [
        ("base", f"{base}  content {p['base']['fingerprint'][:12]}"),
        ("lora" if "lora" in p else "finetuned",
         f"{finetuned}  content {source['fingerprint'][:12]}"),
        ("tensors", f"{len(m.tensors)} ({m.numel:,} parameters), {p['storage_dtype']}, "
                    f"{human_bytes(m.size)}"),
        ("l2 norm", f"{p['l2']:.6g}"),
    ]
    if "factored" in p:
        rows.append(("factored", f"{len(p['factored']['tensors'])} tensor(s) as rank-r factors "
                     f"({p['dense_numel']:,} parameters dense)"))
    if p["storage_dtype"] != "fp32" and "max_rounding_error" in p:
        rows.append(("rounding", f"largest |error| {p['max_rounding_error']:.3g}"))
    if p.get("filtered_out"):
        rows.append(("filtered", f"{p['filtered_out']} tensor(s) left out by the filters"))
    for label, text in rows:
        err.print(f"  {label:<10} {text}", soft_wrap=True, markup=False)
    if result.skipped_non_float:
        shown = ", ".join(result.skipped_non_float[:5])
        more = len(result.skipped_non_float) - 5
        warn(f"skipped {len(result.skipped_non_float)} non-float tensor(s): {shown}"
             + (f" and {more} more" if more > 0 else ""))
    if p.get("nonfinite"):
        warn(f"stored {p['nonfinite']} NaN/Inf value(s) (--allow-nonfinite)")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
