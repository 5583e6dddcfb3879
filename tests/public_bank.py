"""A random-weight task-vector bank in the public task-arithmetic / aTLAS layout, for tests.

Those code bases save whole modules: `zeroshot.pt` / `<Dataset>Val/finetuned.pt` are pickled
`src.modeling.ImageEncoder` modules holding an open_clip CLIP built with QuickGELU whose text
`transformer` was deleted, plus `train_preprocess` / `val_preprocess` transforms; heads are pickled
`src.heads.ClassificationHead(torch.nn.Linear)` modules with `normalize=True` and weight =
normalised class text embeddings x exp(logit_scale). The classes below carry those qualified
names (registered as modules `src.modeling` / `src.heads` while pickling) so the files name the
same classes the real ones do.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

# a small open_clip config (`register`); build_bank also takes open_clip's own "ViT-B-32" etc.
CONFIG = {
    "embed_dim": 16,
    "quick_gelu": False,  # the architecture says nothing: the checkpoints must
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


class ImageEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, train_preprocess, val_preprocess):
        super().__init__()
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess
        self.cache_dir = None
        if hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")  # keep_lang=False, as the public encoders

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None):
        out, inp = weights.shape
        super().__init__(inp, out)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(
            biases.clone() if biases is not None else torch.zeros_like(self.bias)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


@contextlib.contextmanager
def public_names() -> Iterator[None]:
    """Make the classes pickle as `src.modeling.ImageEncoder` / `src.heads.ClassificationHead`."""
    saved = {k: sys.modules.get(k) for k in ("src", "src.modeling", "src.heads")}
    src = types.ModuleType("src")
    modeling, heads = types.ModuleType("src.modeling"), types.ModuleType("src.heads")
    old = (ImageEncoder.__module__, ClassificationHead.__module__)
    ImageEncoder.__module__, ClassificationHead.__module__ = "src.modeling", "src.heads"
    modeling.ImageEncoder, heads.ClassificationHead = ImageEncoder, ClassificationHead
    src.modeling, src.heads = modeling, heads
    sys.modules.update({"src": src, "src.modeling": modeling, "src.heads": heads})
    try:
        yield
    finally:
        ImageEncoder.__module__, ClassificationHead.__module__ = old
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def save_module(module: torch.nn.Module, path: Path, plain: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with public_names():
        if plain:
            with open(path, "wb") as f:
                pickle.dump(module, f)
        else:
            torch.save(module, path)


def register(cfg_dir: Path, name: str = "tvtool-public-bank") -> tuple[str, Path]:
    from tvtool.models.build import register_config

    cfg = cfg_dir / f"{name}.json"
    cfg.write_text(json.dumps(CONFIG))
    register_config(cfg)
    return name, cfg


def full_clip(name: str, seed: int) -> torch.nn.Module:
    """The 'pre-trained' CLIP (QuickGELU, random weights from `seed`), text tower included."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=True).eval()


def transforms(clip: torch.nn.Module) -> tuple:
    """(val_preprocess, train_preprocess) as the public encoders carry them."""
    import open_clip

    size = clip.visual.image_size
    return (
        open_clip.image_transform(size, is_train=False),
        open_clip.image_transform(size, is_train=True),
    )


def encoder_file(path: Path, name: str, seed: int = 0, plain: bool = False) -> torch.nn.Module:
    """Save the public `zeroshot.pt` of architecture `name` (QuickGELU, random weights from
    `seed`, text transformer deleted); returns the full CLIP it was made from, text tower
    included (an independent reference: the saved module shares no code path with tvtool)."""
    ref = full_clip(name, seed)
    enc = ImageEncoder(copy.deepcopy(ref), *transforms(ref))
    save_module(enc, path, plain)
    return ref


def text_head(clip: torch.nn.Module, tokenizer, classnames: list[str], templates: list[str]):
    """The public heads' weight: mean normalised template embedding per class, normalised, x
    exp(logit_scale)."""
    with torch.no_grad():
        rows = []
        for c in classnames:
            e = clip.encode_text(tokenizer([t.format(c) for t in templates]))
            e = F.normalize(e, dim=-1).mean(0)
            rows.append(F.normalize(e, dim=-1))
        return torch.stack(rows) * clip.logit_scale.exp()


def build_bank(
    root: Path,
    name: str,
    datasets: dict[str, list[str]],
    templates: list[str],
    plain: bool = False,
    seed: int = 0,
) -> dict[str, Path]:
    """checkpoints/<model>/{zeroshot.pt, <D>Val/finetuned.pt, head_<D>Val.pt} and the full CLIP
    (`full_clip.pt`, a state dict with the text tower) for --text-tower."""
    import open_clip

    from tvtool.checkpoints.writer import save_safetensors

    clip = full_clip(name, seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {"full": root / "full_clip.safetensors"}
    save_safetensors(out["full"], {k: v.clone() for k, v in clip.state_dict().items()}, {})
    tok = open_clip.get_tokenizer(name)
    ckpt = root / "checkpoints" / name
    tf, train_tf = transforms(clip)
    heads = {d: text_head(clip, tok, cls, templates) for d, cls in datasets.items()}
    zs = ImageEncoder(clip, train_tf, tf)
    out["zeroshot"] = ckpt / "zeroshot.pt"
    save_module(zs, out["zeroshot"], plain)
    for i, (d, _) in enumerate(datasets.items()):
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        ft = copy.deepcopy(zs)  # a "fine-tune": the image tower moved by seeded noise
        with torch.no_grad():
            for k, p in ft.named_parameters():
                if k.startswith("model.visual."):
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        out[f"ft:{d}"] = ckpt / f"{d}Val" / "finetuned.pt"
        save_module(ft, out[f"ft:{d}"], plain)
        out[f"head:{d}"] = ckpt / f"head_{d}Val.pt"
        save_module(ClassificationHead(True, heads[d]), out[f"head:{d}"], plain)
    return out
