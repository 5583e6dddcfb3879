"""Where a merge is written: one file, HF-style shards, or a folder transformers loads.

* `--out FILE.safetensors` (or an existing folder, for a base that is not an HF folder):
  one file, or with `--shard-size` shards beside it plus an index (`recipe.output_files`).
* `--out DIR` with an HF base folder (one holding `config.json`): a model folder. Weights in the
  base's shard layout (the same file names, the same tensors in each) or, with `--shard-size`,
  `model-0000i-of-0000N.safetensors`; a fresh index when there are several files; the base's
  non-weight files (config, generation config, tokenizer files) copied. A folder that already
  holds weights (or those files) is refused unless `--force`; then weights and indexes the
  merge did not write are removed once the new ones are in place.

Tensor names are written exactly as in the base (prefix normalisation is for matching only).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tvtool.checkpoints.writer import TensorSpec
from tvtool.errors import TvtoolError, few
from tvtool.vectors.recipe import output_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack",
                   ".h5", ".gguf")
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
          "vocab.txt", "merges.txt", "spiece.model", "chat_template.json", "chat_template.jinja",
          "preprocessor_config.json")


@dataclass
class OutputLayout:
    files: list[tuple[Path, list[TensorSpec]]]  # tensor names as written (the base's)
    index: Path | None
    folder: Path | None = None  # an HF model folder
    copies: list[Path] = field(default_factory=list)  # base files copied into the folder
    rewrites: dict[str, bytes] = field(default_factory=dict)  # copied names written changed

    def existing(self) -> list[str]:
        """What the merge would overwrite or leave stale."""
        paths = [*(f for f, _ in self.files), self.index]
        found = [str(p) for p in paths if p is not None and p.exists()]
        if self.folder is not None and self.folder.is_dir():
            found += [str(p) for p in self._weights() if str(p) not in found]
            found += [str(self.folder / c.name) for c in self.copies
                      if (self.folder / c.name).exists()]
        return found

    def _weights(self) -> list[Path]:
        assert self.folder is not None
        return sorted(p for p in self.folder.iterdir()
                      if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))

    def finish(self) -> None:
        """After the weights are in place: copy the base's files, remove stale weights."""
        if self.folder is None:
            return
        for src in self.copies:
            if src.name in self.rewrites:  # e.g. config.json with a grown vocab_size
                (self.folder / src.name).write_bytes(self.rewrites[src.name])
            else:
                shutil.copyfile(src, self.folder / src.name)
        written = {f.name for f, _ in self.files} | ({self.index.name} if self.index else set())
        for p in self._weights():
            if p.name not in written:
                p.unlink()


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def plan_output(
    base: Path,
    out: Path,
    specs: list[TensorSpec],
    raw: dict[str, str],
    shard_of: dict[str, str] | None,
    index_name: str | None,
    shard_size: int | None,
) -> OutputLayout:
    """The output layout for `specs` (normalised names; `raw` maps them to the base's names,
    `shard_of` to the base file holding them)."""
    named = [TensorSpec(raw.get(s.name, s.name), s.shape, s.dtype) for s in specs]
    folder_mode = is_hf_folder(base) and not out.name.endswith(".safetensors")
    if not folder_mode:
        target = out / "model.safetensors" if out.is_dir() else out
        if not target.parent.is_dir():
            raise TvtoolError(f"output directory {target.parent} does not exist")
        return OutputLayout(*output_files(target, named, shard_size))
    if out.exists() and not out.is_dir():
        raise TvtoolError(f"{out} is a file: an HF base is written as a folder (--out DIR)")
    if not out.parent.is_dir():
        raise TvtoolError(f"output directory {out.parent} does not exist")
    copies = [base / n for n in COPIED if (base / n).is_file()]
    if out.resolve() == base.resolve():
        raise TvtoolError(f"--out {out} is the base folder: write the merge elsewhere")
    if shard_size or shard_of is None:
        files, index = output_files(out / "model.safetensors", named, shard_size)
        return OutputLayout(files, index, out, copies)
    groups: dict[str, list[TensorSpec]] = {}
    for s, n in zip(specs, named, strict=True):
        groups.setdefault(shard_of[s.name], []).append(n)
    files = [(out / name, groups[name]) for name in sorted(groups)]
    index = None
    if len(files) > 1:
        index = out / (index_name or "model.safetensors.index.json")
    return OutputLayout(files, index, out, copies)


def refuse_existing(layout: OutputLayout, force: bool) -> None:
    found = layout.existing()
    if not found or force:
        return
    if layout.folder is not None:
        names = few([Path(f).name for f in found], 3)
        raise TvtoolError(f"{layout.folder} already holds model files ({names}); use --force to "
                          "replace them (stale weights and indexes are then removed)")
    raise TvtoolError(f"{few(found, 2)} exists; use --force to overwrite")
