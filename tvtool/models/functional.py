"""The image tower as a function of its parameters (for learning or applying task vectors).

Parameters are named as in the checkpoint / state dict (``visual.conv1.weight``), which is how
task vectors are keyed. `encode_images(clip, override, images)` runs the tower with some of its
tensors replaced (e.g. ``base + sum_t Lambda[t] * tau_t`` carrying gradients to Lambda) through
`torch.func.functional_call`; tensors not in `override` are the model's own (frozen) ones.

Logits convention (shared with heads.py): features and head rows are L2-normalised and
``logits = clip.logit_scale * features @ head.T`` where ``clip.logit_scale`` is
``exp(model.logit_scale)`` clamped at 100 (CLIP's own convention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from tvtool.errors import TvtoolError, few
from tvtool.models.loaded import LoadedClip

PREFIX = "visual."


def visual_params(clip: LoadedClip) -> dict[str, torch.Tensor]:
    """The image tower's parameters keyed like the checkpoint (frozen, shared with the model):
    ``visual.*`` for open_clip, the `CLIPModel` names (``vision_model.*``) for HF CLIP."""
    return {clip.tower_prefix + n: p for n, p in clip.model.visual.named_parameters()}


def check_keys(
    clip: LoadedClip, shapes: Mapping[str, tuple[int, ...]], what: str = "task vector"
) -> None:
    """Raise a TvtoolError unless every key names an image-tower parameter of the same shape."""
    params = visual_params(clip)
    unknown = sorted(k for k in shapes if k not in params)
    if unknown:
        raise TvtoolError(
            f"{what} has {len(unknown)} tensor(s) that are not image-tower parameters of "
            f"{clip.name}: {few(unknown)} "
            "(vectors from another architecture, or not restricted to `visual`?)"
        )
    bad = [
        f"{k} {tuple(s)} vs {tuple(params[k].shape)}"
        for k, s in shapes.items()
        if tuple(s) != tuple(params[k].shape)
    ]
    if bad:
        raise TvtoolError(
            f"{what} does not fit {clip.name}: shape mismatch for {', '.join(bad[:4])}"
        )


def encode_images(
    clip: LoadedClip,
    override: Mapping[str, torch.Tensor] | None,
    images: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Image features [N, D] with `override` ({"visual.x": tensor}) replacing those parameters."""
    visual = clip.model.visual
    if not override:
        feats = visual(images)
    else:
        params = {}
        prefix = clip.tower_prefix
        for k, v in override.items():
            if not k.startswith(prefix):
                raise TvtoolError(
                    f"{k!r} is not an image-tower parameter (expected a {prefix!r} key)"
                )
            params[k[len(prefix) :]] = v
        feats = torch.func.functional_call(visual, params, (images,), strict=False)
    if isinstance(feats, (tuple, list)):
        feats = feats[0]
    return F.normalize(feats, dim=-1) if normalize else feats


def logits(clip: LoadedClip, features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Class logits [N, C] from normalised features and a zero-shot head [C, D]."""
    return clip.logit_scale * (features @ head.to(features.dtype).T)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16; None on CPU (full precision)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision for forward passes on CUDA; a no-op on CPU."""
    dtype = autocast_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield
