"""Apply task vectors, learned coefficients or a fine-tuned checkpoint to a loaded model, in memory.

Only the image tower changes (the zero-shot head comes from the base's text tower). A *delta* is
``{parameter name: fp32 tensor on the model's device}``; `apply_delta(clip, delta, s)` gives the
override ``theta_0 + s * delta`` that `functional.encode_images` runs with.

* vectors: ``delta = sum_t w_t * tau_t`` (`VECTOR[:w]`, w defaults to 1);
* coefs: ``delta_i = sum_t coef_for_key(coefs[t], i) * tau_t,i`` (a `coefs` object from compose);
* weights: a fine-tuned checkpoint's image-tower tensors used as the override.

Vectors are mapped onto the model, checked (keys, shapes, recorded base) and streamed key by key
by `tvtool.models.bank.plan_bank`, the same checks compose applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tvtool.errors import TvtoolError
from tvtool.models.functional import visual_params
from tvtool.models.loaded import LoadedClip
from tvtool.store.manifest import Manifest
from tvtool.store.store import Store

Delta = dict[str, torch.Tensor]


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """``[-]name[:w]`` -> (name, signed w): the one term grammar of `tvtool.vectors.terms`."""
    from tvtool.vectors.terms import parse_term

    term = parse_term(spec)
    return term.ref, term.resolved_weight(default)


def plan(clip: LoadedClip, store: Store, names: Sequence[str], allow_other_base: bool = False):
    """A compose BankPlan of `names` against the model's image tower (checks everything)."""
    from tvtool.models.bank import plan_bank

    return plan_bank(
        store,
        list(names),
        visual_params(clip),
        set(clip.model.state_dict()),
        base_fingerprint=clip.base_fingerprint,
        allow_other_base=allow_other_base,
    )


def _accumulate(clip: LoadedClip, store: Store, bank, weight_of) -> Delta:
    """delta[param] = sum_t weight_of(t, key, shape) * tau_t[key], streamed one tensor at a time."""
    from tvtool.vectors.stored import open_tensor_object

    param_of = {k.key: (k.param, k.shape) for k in bank.keys}
    delta: Delta = {}
    with torch.no_grad():
        for t, v in enumerate(bank.vectors):
            _, reader = open_tensor_object(store, v.digest, "vector")
            with reader:
                for key in v.keys:
                    param, shape = param_of[key]
                    w = weight_of(t, key, shape)
                    if w is None:
                        continue
                    tau = reader.get(key).to(clip.device, torch.float32)
                    if param not in delta:
                        delta[param] = torch.zeros(shape, dtype=torch.float32, device=clip.device)
                    delta[param].add_(tau * w)
    return delta


def vectors_delta(
    clip: LoadedClip,
    store: Store,
    items: Sequence[tuple[str, float]],
    allow_other_base: bool = False,
) -> Delta:
    """sum_t w_t * tau_t over the image tower."""
    bank = plan(clip, store, [n for n, _ in items], allow_other_base)
    weights = [float(w) for _, w in items]
    return _accumulate(clip, store, bank, lambda t, key, shape: weights[t])


def coefs_delta(
    clip: LoadedClip, store: Store, ref: str, allow_other_base: bool = False
) -> tuple[Delta, Manifest]:
    """sum_t Lambda[t, block(i)] * tau_t,i for a stored `coefs` object (and its manifest)."""
    from tvtool.vectors.blocks import coef_for_key
    from tvtool.vectors.stored import load_coefs

    manifest, coefs, layout = load_coefs(store, ref)
    coefs = coefs.to(clip.device)
    recorded = manifest.params.get("base_fingerprint")
    if recorded and recorded != clip.base_fingerprint and not allow_other_base:
        raise TvtoolError(
            f"coefs {ref!r} were learned on another base (sha256 {str(recorded)[:12]}, the model's "
            f"is {clip.base_fingerprint[:12]})"
        )
    bank = plan(clip, store, layout.vectors, allow_other_base)
    index = layout.key_index()

    def weight_of(t: int, key: str, shape: tuple[int, ...]):
        if key not in index:
            return None
        return coef_for_key(coefs[t], key, shape, layout, index)

    return _accumulate(clip, store, bank, weight_of), manifest


def apply_delta(clip: LoadedClip, delta: Delta, scale: float = 1.0) -> Delta:
    """Override ``theta_0 + scale * delta`` for `encode_images` (only the parameters in delta)."""
    params = visual_params(clip)
    return {p: params[p] + scale * d.to(params[p].dtype) for p, d in delta.items()}


def checkpoint_override(clip: LoadedClip, path: Path) -> tuple[Delta, int]:
    """The image-tower tensors of a (fine-tuned) checkpoint as an override, and how many of its
    other keys were ignored. Keys are the model's (``visual.*``) or a bare tower's (no prefix)."""
    from tvtool.checkpoints.readers import open_checkpoint

    params = visual_params(clip)
    out: Delta = {}
    with open_checkpoint(path) as reader:
        from tvtool.checkpoints.keymaps import BARE_TOWER_PREFIXES, is_buffer

        keys = [k for k in reader.keys() if not (clip.family == "hf-clip" and is_buffer(k))]
        prefix = ""
        if keys and not any(k in params for k in keys):
            prefix = next(
                (p for p in BARE_TOWER_PREFIXES if all(p + k in params for k in keys)), ""
            )
        bare = bool(prefix)
        model_keys = set(clip.model.state_dict())
        unknown = [k for k in keys if not bare and k not in model_keys]
        if unknown:
            raise TvtoolError(
                f"{path} has {len(unknown)} tensor(s) the model does not have: "
                f"{', '.join(unknown[:4])} (checkpoint of another architecture?)"
            )
        ignored = 0
        for k in keys:
            param = prefix + k
            if param not in params:
                ignored += 1
                continue
            if tuple(reader.meta(k).shape) != tuple(params[param].shape):
                raise TvtoolError(
                    f"{path}: {k} has shape {list(reader.meta(k).shape)}, the model's "
                    f"{list(params[param].shape)}"
                )
            out[param] = reader.get(k).to(clip.device, params[param].dtype)
    if not out:
        raise TvtoolError(f"{path} holds no image-tower tensors of {clip.name}")
    return out, ignored
