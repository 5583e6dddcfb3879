"""Training the zoo's models: CLIP contrastive pre-training and per-domain fine-tuning.

Plain torch on CPU, seeded; `deterministic()` fixes the thread count and asks torch for
deterministic kernels so that the same recipe gives the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from tvtool.demo.domains import CLASSNAMES
from tvtool.demo.recipe import Schedule

Tick = Callable[[int], None]

# the attention linear layers of open_clip's transformer blocks (weights and biases)
ATTENTION = re.compile(r"\.resblocks\.\d+\.attn\.(in_proj_(weight|bias)|out_proj\.(weight|bias))$")


def is_attention(name: str) -> bool:
    """Whether a parameter name is an attention in_proj / out_proj weight or bias."""
    return ATTENTION.search(name) is not None


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, fix the thread count and request deterministic algorithms; restore after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def register_config(path: Path) -> str:
    """Register an open_clip model config file; returns the model name (its stem)."""
    from tvtool.models.build import register_config as register

    return register(path)[0]


def create_model(config_path: Path, state: dict[str, torch.Tensor] | None = None):
    """Build through open_clip's own `create_model` (eval mode), optionally loading `state`."""
    import open_clip

    name = register_config(config_path)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": we load our own
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(previous)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def normaliser(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [N, S, S, 3] -> the float tensor open_clip's eval transform makes of the same PNGs."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(cfg["std"], dtype=torch.float32)[None, :, None, None]

    def norm(images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std

    return norm


def random_shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to +-`pixels` (edges replicated)."""
    if pixels <= 0:
        return x
    s = x.shape[-1]
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    offs = torch.randint(0, 2 * pixels + 1, (x.shape[0], 2), generator=g).tolist()
    return torch.stack([padded[i, :, a : a + s, b : b + s] for i, (a, b) in enumerate(offs)])


def _scheduler(opt: torch.optim.Optimizer, total: int, warmup: float):
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _fit(
    model,
    params: list[torch.Tensor],
    n: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    sched: Schedule,
    g: torch.Generator,
    tick: Tick | None,
) -> list[float]:
    """AdamW with warm-up + cosine over `sched.epochs` seeded passes of `n` examples;
    `batch_loss(indices)` gives one batch's mean loss. Returns the mean loss per epoch."""
    opt = torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    lr_sched = _scheduler(opt, sched.epochs * math.ceil(n / sched.batch_size), sched.warmup)
    model.train()
    losses = []
    for _ in range(sched.epochs):
        total = 0.0
        for b in torch.randperm(n, generator=g).split(sched.batch_size):
            loss = batch_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            total += loss.item() * len(b)
        losses.append(total / n)
        if tick:
            tick(1)
    return losses


def caption_tokens(config_path: Path, templates: list[str]) -> torch.Tensor:
    """Tokens [classes * templates, ctx]: row c * T + t is template t filled with class c."""
    import open_clip

    tok = open_clip.get_tokenizer(register_config(config_path))
    return tok([t.format(c) for c in CLASSNAMES for t in templates])


@torch.no_grad()
def zeroshot_head(model, tokens: torch.Tensor, n_templates: int) -> torch.Tensor:
    """Class embeddings [C, D]: normalised text embeddings averaged over templates, renormalised."""
    feats = F.normalize(model.encode_text(tokens), dim=-1)
    head = feats.view(-1, n_templates, feats.shape[-1]).mean(1)
    return F.normalize(head, dim=-1)


def pretrain_clip(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    n_templates: int,
    sched: Schedule,
    seed: int,
    tick: Tick | None = None,
) -> list[float]:
    """Contrastive image-caption training (open_clip.ClipLoss), a random template per image."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(seed)
    x_all = normaliser(model)(images)
    loss_fn = ClipLoss()
    # The token embedding (49,408 rows, most never used by the captions) stays at its random
    # initialisation: training it would triple the optimiser's work for nothing.
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]

    def batch_loss(b: torch.Tensor) -> torch.Tensor:
        xb = random_shift(x_all[b], sched.shift, g)
        t = torch.randint(0, n_templates, (len(b),), generator=g)
        rows = labels[b] * n_templates + t
        img = model.encode_image(xb, normalize=True)
        # each distinct caption goes through the text tower once per step
        uniq, inverse = torch.unique(rows, return_inverse=True)
        txt = model.encode_text(tokens[uniq], normalize=True)[inverse]
        return loss_fn(img, txt, model.logit_scale.exp())

    losses = _fit(model, params, len(x_all), batch_loss, sched, g, tick)
    model.eval()
    model.token_embedding.weight.requires_grad_(True)
    return losses


def finetune_image_tower(
    model,
    head: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    sched: Schedule,
    seed: int,
    tick: Tick | None = None,
    *,
    attention_only: bool = False,
) -> list[float]:
    """Cross-entropy fine-tuning of `model.visual` only, against the frozen zero-shot head;
    `attention_only` trains only its attention linear layers (in_proj / out_proj)."""
    g = torch.Generator().manual_seed(seed)
    x_all = normaliser(model)(images)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [
        p for n, p in model.visual.named_parameters() if not attention_only or is_attention(n)
    ]
    for p in params:
        p.requires_grad_(True)
    scale = model.logit_scale.exp().detach()

    def batch_loss(b: torch.Tensor) -> torch.Tensor:
        xb = random_shift(x_all[b], sched.shift, g)
        logits = scale * model.encode_image(xb, normalize=True) @ head.t()
        return F.cross_entropy(logits, labels[b])

    losses = _fit(model, params, len(x_all), batch_loss, sched, g, tick)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


@torch.no_grad()
def accuracy(model, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of the zero-shot-head classifier on uint8 images."""
    x = normaliser(model)(images)
    correct = 0
    for b in torch.arange(len(x)).split(512):
        pred = (model.encode_image(x[b], normalize=True) @ head.t()).argmax(-1)
        correct += int((pred == labels[b]).sum())
    return 100.0 * correct / len(x)
