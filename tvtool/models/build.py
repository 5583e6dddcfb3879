"""Build an open_clip model offline: architecture by name or config file, weights from a file.

* `--model NAME` names a built-in open_clip architecture (ViT-B-32, ...); `--model-config FILE`
  registers a custom config (open_clip JSON: embed_dim, vision_cfg, text_cfg) under the file's stem.
  A tvtool extension: the config may carry `"preprocess_cfg": {"mean": [...], "std": [...],
  "interpolation": "bilinear", "resize_mode": "shortest"}`, applied as the model's preprocessing.
* Weights come from `--base FILE` (any format `tvtool extract` reads; keys normalised; every key
  of the model must be present, and no other) or from an open_clip `--pretrained TAG` whose weights
  are already in the local cache (Hugging Face hub cache or ~/.cache/clip). tvtool never
  downloads: a weight that is not cached is a TvtoolError that says how to supply a file.

* The activation is the one the weights were trained with (`resolve_activation`): OpenAI CLIP
  and every bank fine-tuned from it uses QuickGELU, open_clip's default is nn.GELU; the wrong one
  shifts every feature. A pickled module names its activation class, so it is read from there.
* Image-tower-only bases (the public task-arithmetic / aTLAS `ImageEncoder` pickles delete the
  text `transformer`) load with `has_text=False`; heads then come from head files or from
  `--text-tower FILE|TAG` (another checkpoint's, or a cached pretrained tag's, text tower).

`base_fingerprint` identifies the weights (content fingerprint, any format or sharding): heads are
cached under it, and stored task vectors/coefficients record it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub

import torch  # noqa: E402

from tvtool.checkpoints.activation import checkpoint_activation  # noqa: E402
from tvtool.errors import TvtoolError, few  # noqa: E402
from tvtool.models.activation import resolve_activation  # noqa: E402
from tvtool.models.loaded import LoadedClip, resolve_device  # noqa: E402,F401

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs a warning about random init; we load weights ourselves right after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def register_config(path: Path) -> tuple[str, dict[str, Any]]:
    """Register a custom open_clip config; returns (model name = file stem, preprocess dict)."""
    import open_clip

    path = Path(path).expanduser()
    if not path.is_file():
        raise TvtoolError(f"model config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TvtoolError(f"{path}: not a readable JSON model config ({e})") from None
    missing = [
        k
        for k in ("embed_dim", "vision_cfg", "text_cfg")
        if not isinstance(cfg, dict) or k not in cfg
    ]
    if missing:
        raise TvtoolError(f"{path}: an open_clip model config needs {', '.join(missing)}")
    preprocess = cfg.pop("preprocess_cfg", None) or {}
    if not isinstance(preprocess, dict) or set(preprocess) - set(_PREPROCESS_KEYS):
        raise TvtoolError(f"{path}: preprocess_cfg may only set {', '.join(_PREPROCESS_KEYS)}")
    target = path
    if preprocess:  # open_clip's constructor would reject the extra key: register a stripped copy
        target = Path(tempfile.mkdtemp(prefix="tvtool-cfg-")) / path.name
        target.write_text(json.dumps(cfg))
    open_clip.add_model_config(target)
    return path.stem, preprocess


def _cached_pretrained(name: str, tag: str) -> tuple[str, dict[str, Any]]:
    """The local file of an open_clip pretrained tag, or a TvtoolError (never downloads)."""
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = oc_pretrained.list_pretrained_tags_by_model(name)
        known = f" (known tags: {', '.join(tags)})" if tags else ""
        raise TvtoolError(f"open_clip has no pretrained tag {tag!r} for {name}{known}")
    hint = (
        f"open_clip weights {name}/{tag} are not in the local cache and tvtool never downloads; "
        "save the weights to a file and pass it with --base FILE"
    )
    if "file" in cfg and os.path.isfile(cfg["file"]):
        return cfg["file"], cfg
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            raise TvtoolError(hint) from None
        if hub.endswith("/"):
            repo, filename = hub.rstrip("/"), "open_clip_pytorch_model.bin"
        else:
            repo, filename = os.path.split(hub)
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            stem = filename.rsplit(".", 1)[0]
            candidates.insert(
                0,
                "open_clip_model.safetensors"
                if filename == "open_clip_pytorch_model.bin"
                else stem + ".safetensors",
            )
        for fn in candidates:
            hit = try_to_load_from_cache(repo_id=repo, filename=fn)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, cfg
    url = cfg.get("url", "")
    if url:
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(local):
            return local, cfg
    raise TvtoolError(hint)


def load_clip(
    model: str | None = None,
    model_config: Path | None = None,
    base: Path | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    text_tower: str | Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> LoadedClip:
    """Build the architecture and load its weights (see the module docstring). Eval mode.

    quick_gelu: True/False force the activation; None takes it from the checkpoint, the
    architecture name (`-quickgelu`) or the pretrained tag (see `resolve_activation`).
    text_tower: a checkpoint file or a cached open_clip pretrained tag whose text tower (every
    non-`visual.` tensor) replaces the base's; needed for zero-shot heads when the base is
    image-tower-only and no head files are given.

    An HF CLIP folder as `base` (config.json, model_type clip), or an HF config.json as
    `model_config`, builds transformers' model instead (`tvtool.models.hf_clip`; its activation
    is the config's `hidden_act`)."""
    from tvtool.models.hf_clip import is_hf_clip, load_hf_clip

    if model is None and pretrained is None and (
        is_hf_clip(model_config) or (model_config is None and is_hf_clip(base))
    ):
        if base is None:
            raise TvtoolError("an HF config.json needs its weights: give --base FILE or DIR")
        return load_hf_clip(Path(base), model_config, device)
    import open_clip

    if (model is None) == (model_config is None):
        raise TvtoolError("give exactly one of --model NAME or --model-config FILE")
    if base is not None and pretrained is not None:
        raise TvtoolError(
            "give either --base FILE or --pretrained TAG, not both (a text tower from a tag: "
            "--text-tower TAG)"
        )
    if base is None and pretrained is None:
        raise TvtoolError(
            "no weights: give --base FILE (a checkpoint) or --pretrained TAG (cached open_clip "
            "weights)"
        )
    say = warn or (lambda m: warnings.warn(m, stacklevel=3))
    preprocess: dict[str, Any] = {}
    if model_config is not None:
        name, preprocess = register_config(Path(model_config))
    else:
        name = str(model)
        if name not in open_clip.list_models():
            raise TvtoolError(
                f"unknown open_clip architecture {name!r} (see open_clip.list_models(), "
                "or use --model-config FILE)"
            )
    dev = resolve_device(device)
    from tvtool.checkpoints.readers import checkpoint_fingerprint, open_checkpoint

    source, image_only, text_fp = "", False, ""
    with contextlib.ExitStack() as stack:
        if pretrained is not None:
            path, tag_cfg = _cached_pretrained(name, pretrained)
            preprocess = {**{k: tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}, **preprocess}
            declared = "quick_gelu" if tag_cfg.get("quick_gelu") else None
            quick, why, note = resolve_activation(name, declared, quick_gelu)
            net = _create(name, preprocess, quick, path)
            fingerprint, source = checkpoint_fingerprint(path), f"{name}/{pretrained}"
        else:
            reader = stack.enter_context(open_checkpoint(Path(base)))  # type: ignore[arg-type]
            quick, why, note = resolve_activation(name, checkpoint_activation(reader), quick_gelu)
            net = _create(name, preprocess, quick)
            image_only = copy_state(net, reader, Path(base))  # type: ignore[arg-type]
            fingerprint, source = reader.fingerprint(), str(base)  # hashed while copying
        if note:
            say(note)
        if text_tower is not None:
            tpath = _text_tower_file(name, text_tower)
            with open_checkpoint(tpath) as treader:
                copy_text_tower(net, treader, tpath)
                text_fp = treader.fingerprint()
            image_only = False
        elif image_only:
            del net.transformer  # as the public image encoders do: no text tower to run
    try:
        tokenizer = _tokenizer(name)
    except Exception as e:
        raise TvtoolError(f"cannot build the tokenizer of {name} offline: {_first(e)}") from None
    net = net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    pp = net.visual.preprocess_cfg
    size = pp.get("size", net.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return LoadedClip(
        model=net,
        name=name,
        base_fingerprint=fingerprint,
        image_size=size,  # type: ignore[arg-type]
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        interpolation=pp.get("interpolation", "bicubic"),  # type: ignore[arg-type]
        tokenizer=tokenizer,
        device=dev,
        source=source,
        activation="quick_gelu" if quick else "gelu",
        activation_source=why,
        has_text=not image_only,
        text_fingerprint=text_fp,
    )


def _create(
    name: str, preprocess: dict[str, Any], quick: bool, weights: str | None = None
) -> torch.nn.Module:
    """open_clip's model (random weights, or open_clip's own loading of a cached tag's file)."""
    import open_clip

    try:
        with _quiet_open_clip():
            return open_clip.create_model(
                name,
                pretrained=weights,
                force_preprocess_cfg=preprocess or None,
                force_quick_gelu=quick,
            )
    except Exception as e:
        what = f"load {name} from {weights}" if weights else f"build open_clip model {name!r}"
        raise TvtoolError(f"cannot {what}: {_first(e)}") from None


def _is_text_key(key: str) -> bool:
    return key.startswith("transformer.")


def copy_state(net: torch.nn.Module, reader: Any, path: Path) -> bool:
    """Copy a whole-model checkpoint into `net`; every key must fit. A checkpoint without the text
    `transformer` (an image-tower-only base, as the public task-vector banks save) is accepted:
    returns True then (the text transformer keeps random weights until replaced or deleted)."""
    state = net.state_dict()
    keys = set(reader.keys())
    missing = set(state) - keys
    image_only = (
        bool(missing)
        and all(_is_text_key(k) for k in missing)
        and any(k.startswith("visual.") for k in keys)
    )
    _copy(state, reader, path, keys, set() if image_only else missing)
    return image_only


def copy_text_tower(net: torch.nn.Module, reader: Any, path: Path) -> None:
    """Copy every non-image-tower tensor of the model from `reader` (a full CLIP checkpoint)."""
    state = net.state_dict()
    wanted = {k for k in state if not k.startswith("visual.")}
    keys = set(reader.keys())
    missing = wanted - keys
    if missing:
        raise TvtoolError(
            f"{path} has no text tower for this architecture (missing {len(missing)} key(s): "
            f"{_few(sorted(missing))})"
        )
    _copy(state, reader, path, wanted, set())


def _copy(
    state: dict[str, torch.Tensor], reader: Any, path: Path, keys: set[str], missing: set[str]
) -> None:
    unexpected = sorted(k for k in keys if k not in state)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        raise TvtoolError(f"{path} does not fit the model ({'; '.join(parts)})")
    bad = [
        f"{k} {tuple(reader.meta(k).shape)} vs {tuple(state[k].shape)}"
        for k in sorted(keys)
        if tuple(reader.meta(k).shape) != tuple(state[k].shape)
    ]
    if bad:
        raise TvtoolError(f"{path}: shape mismatch for {len(bad)} tensor(s): {_few(bad)}")
    with torch.no_grad():
        for k in sorted(keys):
            state[k].copy_(reader.get(k).to(state[k].dtype))


def _text_tower_file(name: str, spec: str | Path) -> Path:
    """--text-tower: an existing checkpoint path, else a cached open_clip pretrained tag."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if "/" in str(spec) or str(spec).endswith((".pt", ".bin", ".safetensors", ".pth")):
        raise TvtoolError(f"text tower checkpoint not found: {p}")
    path, _ = _cached_pretrained(name, str(spec))
    return Path(path)


_TOKENIZERS: dict[tuple[str, str], Any] = {}


def _tokenizer(name: str) -> Any:
    """open_clip's tokenizer for `name`, built once per (name, text config) in a process."""
    import open_clip

    key = (
        name,
        json.dumps((open_clip.get_model_config(name) or {}).get("text_cfg"), sort_keys=True),
    )
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = open_clip.get_tokenizer(name)
    return _TOKENIZERS[key]


def load_state(net: torch.nn.Module, path: Path, strict: bool = True) -> str:
    """Copy a checkpoint's tensors into `net` key by key; returns the file's fingerprint.

    strict: the checkpoint must hold every key of the model's state dict and no other.
    Otherwise (fine-tuned weights over a base): keys must be a subset; the others stay.
    """
    from tvtool.checkpoints.readers import open_checkpoint

    with open_checkpoint(path) as reader:
        keys = set(reader.keys())
        missing = set(net.state_dict()) - keys if strict else set()
        _copy(net.state_dict(), reader, Path(path), keys, missing)
        return reader.fingerprint()


def _few(items: list[str], n: int = 5) -> str:
    return few(items, n)


def _first(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__
