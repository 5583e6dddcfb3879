"""Image domains: fixed, deterministic transforms of scikit-learn's handwritten digits.

A domain is a chain of named operations applied to grey-level digits (ink = 1, paper = 0, upsampled
to the model's image size), ending in RGB. Nothing here depends on the run's seed: the same digit
always looks the same in a given domain (the noise domain draws from a fixed generator keyed by
the digit's index).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

NOISE_SIGMA = 0.25
NOISE_SEED = 20240605
CHECKER_LEVEL = 0.6
CHECKER_PERIOD = 4  # pixels per light+dark pair
INK_RGB = (0.1, 0.2, 0.9)  # blue
PAPER_RGB = (1.0, 0.6, 0.1)  # orange

GreyOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_digits_grey(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float [N, S, S] in [0, 1] (bilinear upsampling) and labels [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        from tvtool.errors import TvtoolError

        raise TvtoolError("the example zoo needs scikit-learn: pip install 'tvtool[demo]'") from e
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    up = F.interpolate(
        images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    return up[:, 0].clamp(0, 1), torch.tensor(bunch.target, dtype=torch.int64)


def _invert(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _edge(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude, scaled so each image's strongest edge is 1."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    k = torch.stack([kx, kx.t()])[:, None]
    g = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), k)
    mag = g.pow(2).sum(1).sqrt()
    peak = mag.flatten(1).amax(1).clamp_min(1e-6)
    return mag / peak[:, None, None]


def _checker(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The digit drawn over a checkerboard texture (max of the two)."""
    s = x.shape[-1]
    r = torch.arange(s) // (CHECKER_PERIOD // 2)
    board = ((r[:, None] + r[None, :]) % 2).float() * CHECKER_LEVEL
    return torch.maximum(x, board)


def _shrink(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Half size, in the top-left corner of a blank canvas."""
    s = x.shape[-1]
    small = F.avg_pool2d(x[:, None], 2)[:, 0]
    out = torch.zeros_like(x)
    out[:, : s // 2, : s // 2] = small
    return out


def _rot90(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _noise(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gaussian pixel noise, the same for a given digit index on every run."""
    out = torch.empty_like(x)
    for row, i in enumerate(idx.tolist()):
        g = torch.Generator().manual_seed(NOISE_SEED + int(i))
        out[row] = x[row] + NOISE_SIGMA * torch.randn(x.shape[1:], generator=g)
    return out.clamp(0, 1)


GREY_OPS: dict[str, GreyOp] = {
    "invert": _invert,
    "edge": _edge,
    "checker": _checker,
    "shrink": _shrink,
    "rot90": _rot90,
    "noise": _noise,
}

# Every domain the zoo knows: a chain of grey operations, then "grey" or "color" to make RGB.
DOMAINS: dict[str, tuple[tuple[str, ...], str]] = {
    "original": ((), "grey"),
    "noise": (("noise",), "grey"),
    "invert": (("invert",), "grey"),
    "edge": (("edge",), "grey"),
    "checker": (("checker",), "grey"),
    "shrink": (("shrink",), "grey"),
    "color": ((), "color"),
    "rot90": (("rot90",), "grey"),
    # held-out targets: two task domains' changes at once
    "inv_edge": (("edge", "invert"), "grey"),
    "color_shrink": (("shrink",), "color"),
    "checker_inv": (("checker", "invert"), "grey"),
}


def describe(domain: str) -> str:
    ops, mode = DOMAINS[domain]
    chain = list(ops) + (["color"] if mode == "color" else [])
    return " then ".join(chain) if chain else "identity"


def apply_domain(domain: str, grey: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Grey digits [N, S, S] (dataset indices `idx`) -> float RGB [N, 3, S, S] in [0, 1]."""
    if domain not in DOMAINS:
        from tvtool.errors import TvtoolError

        raise TvtoolError(f"unknown zoo domain {domain!r}; known: {', '.join(DOMAINS)}")
    ops, mode = DOMAINS[domain]
    x = grey
    for op in ops:
        x = GREY_OPS[op](x, idx).clamp(0, 1)
    if mode == "color":
        ink = torch.tensor(INK_RGB)[None, :, None, None]
        paper = torch.tensor(PAPER_RGB)[None, :, None, None]
        return x[:, None] * ink + (1 - x[:, None]) * paper
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1] -> uint8 [N, S, S, 3] (the bytes written to PNG)."""
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
