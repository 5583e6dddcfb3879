"""The linear-probe baseline: logistic regression on the frozen base's image features.

It sees exactly the shots `compose --shots k --seed s` trains on (same folder, same sampler) and is
initialised at the zero-shot head (so 0 steps = zero-shot), then trained with L2 regularisation.
"""

from __future__ import annotations

from pathlib import Path

STEPS = 300
LR = 1e-2
L2 = 1e-3


def linear_probe(
    model_config: Path,
    base: Path,
    templates: Path,
    data: Path,
    shots: int,
    seed: int,
    device: str = "auto",
) -> dict:
    """Accuracy (fraction) on DIR/test of a probe trained on `shots` per class of DIR/train."""
    import torch
    import torch.nn.functional as F

    from tvtool.datasets import images as mdata
    from tvtool.datasets.splits import few_shot_indices
    from tvtool.models.build import load_clip
    from tvtool.models.functional import encode_images
    from tvtool.models.heads import compute_head, load_templates

    clip = load_clip(model_config=model_config, base=base, device=device)
    train = mdata.ImageFolder(data, split="train")
    test = mdata.ImageFolder(data, split="test")
    idx = few_shot_indices(train.labels, shots, seed, train.classnames)
    tf = mdata.eval_transform(clip)

    @torch.no_grad()
    def features(folder, indices):
        x, y = mdata.load_tensors(folder, indices, tf)
        feats = [encode_images(clip, None, b.to(clip.device)).float() for b in x.split(256)]
        return torch.cat(feats), y.to(clip.device)

    f_train, y_train = features(train, idx)
    f_test, y_test = features(test, list(range(len(test))))
    head = compute_head(clip, train.classnames, load_templates(templates))
    torch.manual_seed(seed)
    w = (head.detach().float() * clip.logit_scale).clone().requires_grad_(True)
    b = torch.zeros(w.shape[0], device=w.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=LR)
    with torch.enable_grad():
        for _ in range(STEPS):
            loss = F.cross_entropy(f_train @ w.t() + b, y_train) + L2 * w.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (f_test @ w.t() + b).argmax(-1)
    return {
        "accuracy": float((pred == y_test).float().mean()),
        "shots": shots,
        "train": len(idx),
        "n": len(test),
    }
