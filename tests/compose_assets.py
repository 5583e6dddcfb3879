"""Test assets for compose/select/eval (helpers, no tests, no fixtures: the fixtures that build
them live in conftest.py): a tiny open_clip config, synthetic image tasks written as PNG folders,
and task vectors from briefly fine-tuned copies.

Built once per session (about 10 s on one core) into a temporary directory; each test then
extracts the vectors it needs into its own isolated store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 16,
        "patch_size": 4,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = {
    "colors": ["red", "green", "blue"],
    "stripes": ["horizontal", "vertical"],
}


def _image(task: str, c: int, g: torch.Generator) -> torch.Tensor:
    """A 16x16 RGB image in [0, 1] of class c of a synthetic task."""
    x = 0.35 + 0.15 * torch.rand(3, 16, 16, generator=g)
    if task == "colors":
        x[c] += 0.45
    else:
        period = int(torch.randint(3, 5, (1,), generator=g))
        line = (torch.arange(16) % period == 0).float() * 0.5
        x += line.view(1, 16, 1) if c == 0 else line.view(1, 1, 16)
    return x.clamp(0, 1)


def write_task(root: Path, task: str, per_class: int, seed: int) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES[task]):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (_image(task, c, g) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def train_tower(clip, tower: torch.nn.Module, data: Path, steps: int, lr: float) -> None:
    """Train `tower`'s parameters in place on a folder against the frozen zero-shot head."""
    from tvtool.datasets import images as mdata
    from tvtool.models.functional import encode_images
    from tvtool.models.heads import compute_head

    folder = mdata.ImageFolder(data)
    head = compute_head(clip, folder.classnames, ["a photo of {}."])
    images, labels = mdata.load_tensors(
        folder, list(range(len(folder))), mdata.eval_transform(clip)
    )
    params = list(tower.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            clip.logit_scale * encode_images(clip, None, images) @ head.T, labels
        )
        loss.backward()
        opt.step()


def finetune(
    cfg: Path, base: Path, data: Path, out: Path, steps: int = 40, lr: float = 2e-3
) -> Path:
    """Fine-tune the image tower on a folder (frozen zero-shot head) and save the whole model."""
    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.models.build import load_clip

    clip = load_clip(model_config=cfg, base=base)
    train_tower(clip, clip.model.visual, data, steps, lr)
    state = {k: v.detach().clone().contiguous() for k, v in clip.model.state_dict().items()}
    save_safetensors(out, state, {})
    return out


@dataclass
class Assets:
    root: Path
    cfg: Path
    base: Path
    other_base: Path
    colors: Path
    colors_val: Path
    stripes: Path
    ft_colors: Path
    ft_stripes: Path


def model_args(a: Assets) -> list[str]:
    return ["--model-config", str(a.cfg), "--base", str(a.base), "--device", "cpu"]


def extract(a: Assets, ft: Path, name: str, base: Path | None = None, visual: bool = True) -> str:
    from tvtool.store.store import Store
    from tvtool.vectors.extract import extract_vector
    from tvtool.vectors.filters import TensorFilter

    keep = TensorFilter(presets=["visual"]) if visual else TensorFilter()
    return extract_vector(Store(), base or a.base, ft, keep=keep, name=name).digest


def load_bank(model, store, names, granularity="tensor", partitions=1, seed=5, dtype=torch.float32):
    """(plan, layout, stacks on the CPU) for stored vectors `names`."""
    from tvtool.compose.coefs import attach_layout, build_layout
    from tvtool.models.bank import load_stacks, plan_bank
    from tvtool.models.functional import visual_params

    tower, keys = visual_params(model), set(model.model.state_dict())
    plan = plan_bank(store, names, tower, keys, model.base_fingerprint)
    layout = build_layout(plan, granularity, partitions, seed)
    stacks = load_stacks(store, plan, torch.device("cpu"), dtype)
    attach_layout(layout, stacks)
    return plan, layout, stacks


TINY = {  # the smallest open_clip config: the model and eval tests build it under own names
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def tiny_clip(cfg: Path, config: dict, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """Write `config` to `cfg` (open_clip names the model after the file stem), register it and
    build it with weights from `torch.manual_seed(seed)`: (model name, state dict)."""
    import open_clip

    from tvtool.models.build import register_config

    cfg.write_text(json.dumps(config))
    name, _ = register_config(cfg)
    torch.manual_seed(seed)
    net = open_clip.create_model(name, pretrained=None)
    return name, {k: v.detach().clone() for k, v in net.state_dict().items()}


def build_assets(root: Path) -> Assets:
    """Write everything into `root` (an empty directory)."""
    import open_clip

    from tvtool.checkpoints.writer import save_safetensors
    from tvtool.models.build import register_config

    cfg = root / "tvtool-tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    name, _ = register_config(cfg)
    paths = {}
    for tag, seed in (("base", 0), ("other_base", 1)):
        torch.manual_seed(seed)
        net = open_clip.create_model(name, pretrained=None)
        paths[tag] = root / f"{tag}.safetensors"
        save_safetensors(
            paths[tag],
            {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
            {},
        )
    colors = write_task(root / "colors", "colors", 12, seed=1)
    colors_val = write_task(root / "colors_val", "colors", 8, seed=2)
    stripes = write_task(root / "stripes", "stripes", 12, seed=3)
    ft_colors = finetune(cfg, paths["base"], colors, root / "ft_colors.safetensors")
    ft_stripes = finetune(cfg, paths["base"], stripes, root / "ft_stripes.safetensors")
    return Assets(
        root,
        cfg,
        paths["base"],
        paths["other_base"],
        colors,
        colors_val,
        stripes,
        ft_colors,
        ft_stripes,
    )


def accuracy(clip, data: Path, override=None) -> float:
    from tvtool.datasets import images as mdata
    from tvtool.models.functional import encode_images
    from tvtool.models.heads import zeroshot_head

    folder = mdata.ImageFolder(data)
    head = zeroshot_head(clip, folder.classnames)
    images, labels = mdata.load_tensors(
        folder, list(range(len(folder))), mdata.eval_transform(clip)
    )
    with torch.no_grad():
        pred = (encode_images(clip, override, images) @ head.T).argmax(-1)
    return float((pred == labels).float().mean())
