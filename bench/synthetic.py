"""Synthetic checkpoints of ViT-B/32 size for benchmarks (no downloads).

`make_vit_b32_like` writes the image tower of an open_clip ViT-B/32 (keys `visual.*`, 152
tensors, about 87.8M float32 parameters at `scale=1.0`) as safetensors, streamed tensor by tensor
so that writing it never holds the whole model. `make_finetuned` adds seeded Gaussian noise to
every float tensor of a base checkpoint (tensor by tensor too), giving a "fine-tuned" model whose
task vector is that noise.

Import from a bench script run as `python bench/NAME.py` (bench/ is then on sys.path):

    from synthetic import make_vit_b32_like, make_finetuned
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from tvtool.checkpoints.readers import open_checkpoint
from tvtool.checkpoints.writer import SafetensorsStreamWriter, TensorSpec, atomic_output


def vit_b32_shapes(scale: float = 1.0, layers: int = 12) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an open_clip ViT-B/32 image tower. `scale` multiplies the width (768)
    and the output dimension (512); parameters grow with about scale**2."""
    w = max(8, int(round(768 * scale / 8)) * 8)
    out = max(8, int(round(512 * scale / 8)) * 8)
    patch, grid = 32, 7
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w),
        "visual.proj": (w, out),
        "visual.conv1.weight": (w, 3, patch, patch),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,),
        "visual.ln_post.bias": (w,),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (w,),
            p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w),
            p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w),
            p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,),
            p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w),
            p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w),
            p + "mlp.c_proj.bias": (w,),
        })
    return dict(sorted(shapes.items()))


def n_params(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _gen(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def _write_streamed(
    path: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    force: bool = True,
) -> Path:
    path = Path(path)
    with atomic_output(path, force=force) as f:
        w = SafetensorsStreamWriter(f, specs, {"generator": "tvtool-bench-synthetic"})
        for s in specs:
            w.write(s.name, produce(s))
        w.finish()
    return path


def make_vit_b32_like(
    path: str | Path, seed: int = 0, scale: float = 1.0, layers: int = 12
) -> Path:
    """Write a random ViT-B/32-shaped float32 checkpoint (safetensors) to `path`; return it.

    Weights ~ N(0, 0.02), norm weights 1, biases 0 (so a task vector touches them all)."""
    shapes = vit_b32_shapes(scale, layers)
    specs = [TensorSpec(k, s, torch.float32) for k, s in shapes.items()]

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
            return torch.ones(spec.shape)
        if spec.name.endswith("bias"):
            return torch.zeros(spec.shape)
        return torch.randn(spec.shape, generator=_gen(seed, spec.name)) * 0.02

    return _write_streamed(Path(path), specs, produce)


def make_finetuned(
    base_path: str | Path,
    out: str | Path,
    seed: int = 1,
    noise: float = 1e-3,
) -> Path:
    """Write base + N(0, noise) (per float tensor, seeded per name) to `out` (safetensors)."""
    with open_checkpoint(base_path) as r:
        specs = [TensorSpec(k, r.meta(k).shape, r.meta(k).dtype) for k in r.keys()]

        def produce(spec: TensorSpec) -> torch.Tensor:
            t = r.get(spec.name)
            if not t.is_floating_point():
                return t
            delta = torch.randn(spec.shape, generator=_gen(seed, spec.name)) * noise
            return (t.float() + delta).to(t.dtype)

        return _write_streamed(Path(out), specs, produce)


if __name__ == "__main__":
    s = vit_b32_shapes()
    print(f"{len(s)} tensors, {n_params(s) / 1e6:.2f}M parameters")
