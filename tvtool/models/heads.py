"""Zero-shot classification heads from the base model's text tower.

For each class c: embed every template filled with c (``"a photo of a {}."``), L2-normalise each
embedding, average them, L2-normalise the mean. The head is [C, D] in fp32; logits are
``clip.logit_scale * features @ head.T`` (see functional.py). Heads are computed in fp32 (no
autocast) so the cached result does not depend on the device.

With a store, a head is cached as a `head` object under the ref ``cache/heads/<sha256>`` where the
sha256 is taken over (model name, text-tower fingerprint, activation, class names, templates); a
later run with the same inputs reads it back instead of running the text tower. Heads can also
come from files (`--head FILE`: the public `ClassificationHead` pickles or a tensor), kept in the
store the same way under ``cache/heads/file-<sha256 of the file>``; an image-tower-only base
needs them (or `--text-tower`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tvtool.errors import TvtoolError
from tvtool.models.loaded import LoadedClip
from tvtool.store.store import Store

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a good photo of a {}.",
)


def load_templates(path: Path | None) -> list[str]:
    """Templates from a file (one per line, each with one `{}` for the class name) or defaults."""
    from tvtool.datasets.templates import check_templates, read_lines

    if path is None:
        return list(DEFAULT_TEMPLATES)
    return check_templates(read_lines(path, "templates"), f"{path}:")


def head_key(clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """sha256 identifying a head: (model name, text-tower weights, activation, class names,
    templates). The text tower is the base's unless `--text-tower` replaced it."""
    doc: dict = {
        "model": clip.name,
        "base": clip.text_fingerprint or clip.base_fingerprint,
        "classnames": list(classnames),
        "templates": list(templates),
    }
    if clip.activation != "gelu":
        doc["activation"] = clip.activation
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def read_head_file(path: Path, clip: LoadedClip, n_classes: int) -> torch.Tensor:
    """A head [C, D] from a file: a pickled `ClassificationHead` (an nn.Linear whose weight is the
    normalised class embeddings x exp(logit_scale), applied to normalised features; the public
    task-arithmetic / aTLAS `head_<Dataset>.pt`), any checkpoint with one 2-D `weight`, or a file
    holding one [C, D] tensor. Rows are L2-normalised: tvtool applies clip.logit_scale itself, the
    same scale such heads were multiplied by, so logits match the head module's up to its bias."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TvtoolError(f"head file not found: {path}")
    weight, bias = _head_tensors(path)
    if weight.dim() != 2:
        raise TvtoolError(f"{path}: a head is a [classes, dim] matrix, not {list(weight.shape)}")
    dim = int(clip.model.visual.output_dim) if hasattr(clip.model.visual, "output_dim") else None
    if dim is not None and weight.shape[1] != dim:
        raise TvtoolError(
            f"{path}: head rows have {weight.shape[1]} dimensions, {clip.name}'s image features "
            f"{dim}"
        )
    if weight.shape[0] != n_classes:
        raise TvtoolError(
            f"{path}: the head has {weight.shape[0]} classes, the data set {n_classes}"
        )
    if bias is not None and float(bias.abs().max()) > 0:
        raise TvtoolError(f"{path}: the head has a non-zero bias, which zero-shot heads never have")
    return F.normalize(weight.float(), dim=-1).to(clip.device)


def _head_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    import warnings

    from tvtool.checkpoints.torch_file import check_archive, check_view

    obj = None
    try:  # a bare tensor saved with torch.save (archive checked first: no bombs, no mmap)
        mmap = check_archive(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. weights_only's note on pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - not a bare tensor: read it as a checkpoint below
        pass
    if isinstance(obj, torch.Tensor):
        why = check_view(obj)
        if why:
            raise TvtoolError(f"{path}: not a readable head ({why})")
        return obj, None
    from tvtool.checkpoints.readers import open_checkpoint

    with open_checkpoint(path) as reader:
        keys = reader.keys()
        if "weight" in keys:
            bias = reader.get("bias") if "bias" in keys else None
            return reader.get("weight"), bias
        matrices = [k for k in keys if len(reader.meta(k).shape) == 2]
        if len(matrices) != 1:
            raise TvtoolError(
                f"{path}: expected a head (a `weight` or a single [classes, dim] tensor), found "
                f"{', '.join(keys[:5]) or 'no tensors'}"
            )
        return reader.get(matrices[0]), None


def _cached(store: Store, ref: str, device: torch.device) -> torch.Tensor | None:
    digest = store.get_ref(ref)
    if digest is None:
        return None
    try:
        from tvtool.vectors.stored import load_tensor_object

        _, tensors = load_tensor_object(store, digest, "head")
        return tensors["head"].to(device, torch.float32)
    except (TvtoolError, KeyError):
        return None  # missing or unreadable cache entry: recompute and rewrite it


def _cache(store: Store, ref: str, head: torch.Tensor, params: dict) -> None:
    from tvtool.vectors.stored import save_tensor_object

    manifest = save_tensor_object(
        store, "head", {"head": head.detach().cpu().contiguous()}, params=params
    )
    store.set_ref(ref, manifest.digest, force=True)


def file_head(
    clip: LoadedClip, path: Path, classnames: Sequence[str], store: Store | None = None
) -> torch.Tensor:
    """The head of a head file (see `read_head_file`), kept in `store` as a `head` object under
    ``cache/heads/<sha256 of the file>`` so runs record and reuse it."""
    if store is None:
        return read_head_file(path, clip, len(classnames))
    from tvtool.checkpoints.readers import file_sha256

    sha = file_sha256(Path(path).expanduser())
    ref = f"cache/heads/file-{sha}"
    head = _cached(store, ref, clip.device)
    if head is not None and head.shape[0] == len(classnames):
        return head
    head = read_head_file(path, clip, len(classnames))
    params = {"model": clip.name, "file": str(path), "file_sha256": sha}
    _cache(store, ref, head, {**params, "classnames": list(classnames), "key": ref})
    return head


@torch.no_grad()
def compute_head(
    clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str], chunk: int = 512
) -> torch.Tensor:
    """The normalised zero-shot head [C, D] (fp32, on clip.device); no caching."""
    if not classnames:
        raise TvtoolError("no class names to build a head from")
    from tvtool.datasets.templates import fill

    prompts = [fill(t, c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(prompts), chunk):
        tokens = clip.tokenizer(prompts[i : i + chunk]).to(clip.device)
        embs.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1))
    emb = torch.cat(embs).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def zeroshot_head(
    clip: LoadedClip,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    store: Store | None = None,
    head_file: Path | None = None,
) -> torch.Tensor:
    """The zero-shot head [C, D] (fp32, on clip.device), cached in `store` when one is given:
    read from `head_file` when given, else computed with the (base's or --text-tower's) text
    tower."""
    if head_file is not None:
        return file_head(clip, head_file, classnames, store)
    if not clip.has_text:
        raise TvtoolError(
            f"{clip.source or 'the base'} is an image tower only (its text transformer was "
            "deleted): give the zero-shot heads with --head FILE (one per data set), or a text "
            "tower with --text-tower FILE|TAG"
        )
    templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
    if store is None:
        return compute_head(clip, classnames, templates)
    key = head_key(clip, classnames, templates)
    ref = f"cache/heads/{key}"
    head = _cached(store, ref, clip.device)
    if head is not None:
        return head
    head = compute_head(clip, classnames, templates)
    params = {
        "model": clip.name,
        "base_fingerprint": clip.base_fingerprint,
        "classnames": list(classnames),
        "templates": templates,
        "key": key,
    }
    if clip.text_fingerprint:
        params["text_tower_fingerprint"] = clip.text_fingerprint
    _cache(store, ref, head, params)
    return head
