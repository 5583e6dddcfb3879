"""What the eval tests share: a tiny open_clip base with two 'fine-tuned' checkpoints
(base + tau_t) and two image data sets with test/val splits; the eval command line over them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from compose_assets import TINY, tiny_clip

CLASSES = ("apple", "big_cat", "car")


def write_images(root: Path, n: int, seed: int) -> None:
    """`n` random 16x16 PNGs per class in `root/<class>/`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )


def build_eval_env(d: Path) -> dict:
    """Config, base and two fine-tuned checkpoints, data sets `one` and `two`, all in `d`."""
    from tvtool.checkpoints.writer import save_safetensors

    cfg = d / "tvtool-test-eval.json"
    name, base = tiny_clip(cfg, TINY)
    save_safetensors(d / "base.safetensors", base, {})
    g = torch.Generator().manual_seed(1)
    taus = []
    for t in range(2):
        tau = {
            k: 0.5 * torch.randn(v.shape, generator=g)
            for k, v in base.items()
            if k.startswith("visual.")
        }
        taus.append(tau)
        ft = {k: v + tau[k] if k in tau else v for k, v in base.items()}
        save_safetensors(d / f"ft{t}.safetensors", ft, {})
    for i, ds in enumerate(("one", "two")):
        write_images(d / ds / "test", 4, seed=10 + i)
        write_images(d / ds / "val", 3, seed=20 + i)
    return {"dir": d, "cfg": cfg, "base": base, "taus": taus, "name": name}


def base_args(env: dict, *data: str) -> list[str]:
    """`eval` with the tiny model and base on the CPU, over the named data sets (default one)."""
    args = [
        "eval",
        "--model-config",
        env["cfg"],
        "--base",
        env["dir"] / "base.safetensors",
        "--device",
        "cpu",
    ]
    for ds in data or ("one",):
        args += ["--data", env["dir"] / ds]
    return args
