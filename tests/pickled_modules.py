"""Whole pickled modules for reader tests: an `ImageEncoder` like the task-vector code bases
save (a backbone, a non-module attribute, a non-persistent buffer), pickled as if its classes
lived in a module that does not exist when loading."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch


class Preprocess:
    """A non-module attribute, as ImageEncoder keeps its torchvision transforms."""

    def __init__(self) -> None:
        self.size = 224


class Backbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5))
        self.register_buffer("position_ids", torch.arange(5))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class ImageEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Backbone()
        self.train_preprocess = Preprocess()
        self.cache_dir = "/nonexistent"


def save_under_fake_module(obj: object, path: Path, module: str = "src_fake.modeling") -> None:
    """Pickle `obj` as if its classes lived in `module`, a module that does not exist when
    loading: the restricted unpickler must never try to import it."""
    fake = types.ModuleType(module)
    classes = (ImageEncoder, Backbone, Preprocess)
    old = {c: c.__module__ for c in classes}
    for c in classes:
        setattr(fake, c.__name__, c)
        c.__module__ = module
    parent = module.split(".")[0]
    sys.modules[parent] = types.ModuleType(parent)
    sys.modules[module] = fake
    try:
        torch.save(obj, path)
    finally:
        del sys.modules[module], sys.modules[parent]
        for c, m in old.items():
            c.__module__ = m
