"""Zero-shot classification heads from the base model's text tower.

For each class c: embed every template filled with c (``"a photo of a {}."``), L2-normalise each
embedding, average them, L2-normalise the mean. The head is [C, D] in fp32; logits are
``clip.logit_scale * features @ head.T`` (see functional.py). Heads are computed in fp32 (no
autocast) so the cached result does not depend on the device.

With a store, a head is cached as a `head` object under the ref ``cache/heads/<sha256>`` where the
sha256 is taken over (model name, base fingerprint, class names, templates); a later run with the
same inputs reads it back instead of running the text tower.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tvtool.errors import TvtoolError
from tvtool.models.build import LoadedClip
from tvtool.store.store import Store

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a good photo of a {}.",
)


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a text file (class names, templates)."""
    path = Path(path).expanduser()
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise TvtoolError(f"cannot read {what} file {path}: {e}") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise TvtoolError(f"{what} file {path} is empty")
    return lines


def load_templates(path: Path | None) -> list[str]:
    """Templates from a file (one per line, each with one `{}` for the class name) or defaults."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise TvtoolError(
            f"{path}: every template needs exactly one '{{}}' for the class name, e.g. {bad[0]!r}"
        )
    return templates


def head_key(clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """sha256 identifying a head: (model name, base fingerprint, class names, templates)."""
    doc = {
        "model": clip.name,
        "base": clip.base_fingerprint,
        "classnames": list(classnames),
        "templates": list(templates),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def compute_head(
    clip: LoadedClip, classnames: Sequence[str], templates: Sequence[str], chunk: int = 512
) -> torch.Tensor:
    """The normalised zero-shot head [C, D] (fp32, on clip.device); no caching."""
    if not classnames:
        raise TvtoolError("no class names to build a head from")
    prompts = [t.format(c) for c in classnames for t in templates]
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
) -> torch.Tensor:
    """The zero-shot head [C, D] (fp32, on clip.device), cached in `store` when one is given."""
    templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
    if store is None:
        return compute_head(clip, classnames, templates)
    key = head_key(clip, classnames, templates)
    ref = f"cache/heads/{key}"
    digest = store.get_ref(ref)
    if digest is not None:
        try:
            from tvtool.vectors.stored import load_tensor_object

            _, tensors = load_tensor_object(store, digest, "head")
            return tensors["head"].to(clip.device, torch.float32)
        except (TvtoolError, KeyError):
            pass  # missing or unreadable cache entry: recompute and rewrite it
    head = compute_head(clip, classnames, templates)
    from tvtool.vectors.stored import save_tensor_object

    manifest = save_tensor_object(
        store,
        "head",
        {"head": head.detach().cpu().contiguous()},
        params={
            "model": clip.name,
            "base_fingerprint": clip.base_fingerprint,
            "classnames": list(classnames),
            "templates": templates,
            "key": key,
        },
    )
    store.set_ref(ref, manifest.digest, force=True)
    return head
