"""Seeded batches that do not depend on the number of processes.

An epoch visits every data set in an order drawn from (seed, epoch, data set). An optimisation
step takes `batch_size * grad_accum` samples of each data set (the longest sets the number of
steps; shorter ones wrap around, never repeating a sample within a step), split into
`grad_accum` micro-batches; under torchrun each micro-batch is sharded by rank (`[rank::world]`).
A sample's augmentation is seeded by (seed, data set, epoch, position in the epoch), so one
process and N processes see the very same views, and a resumed run the same as an uninterrupted
one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (stable across runs and platforms)."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class Micro:
    """One micro-batch: per data set, this rank's (position, sample) pairs and the step's global
    sample count of that data set (the loss is a mean over the whole step)."""

    items: list[list[tuple[int, int]]]
    step_counts: list[int]


def steps_per_epoch(sizes: list[int], batch_size: int, grad_accum: int) -> int:
    per_step = batch_size * grad_accum
    return -(-max(sizes) // per_step)


def epoch_plan(
    sizes: list[int],
    batch_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
) -> list[list[Micro]]:
    """steps -> micro-batches of this rank, for data sets of `sizes` samples."""
    per_step = batch_size * grad_accum
    n_max = max(sizes)
    perms = []
    for k, n in enumerate(sizes):
        g = torch.Generator().manual_seed(mix_seed("order", seed, epoch, k))
        perms.append(torch.randperm(n, generator=g).tolist())
    plan: list[list[Micro]] = []
    for s in range(steps_per_epoch(sizes, batch_size, grad_accum)):
        c_step = min(per_step, n_max - s * per_step)
        counts = [min(c_step, n) for n in sizes]
        micros = []
        for m in range(grad_accum):
            items = []
            for k, n in enumerate(sizes):
                js = range(m * batch_size, min((m + 1) * batch_size, counts[k]))
                glob = [(s * per_step + j, perms[k][(s * per_step + j) % n]) for j in js]
                items.append(glob[rank::world])
            if m * batch_size < c_step:
                micros.append(Micro(items, counts))
        plan.append(micros)
    return plan


class SeededView(torch.utils.data.Dataset):
    """Items (position, sample index) of `base` with per-item seeded augmentation."""

    def __init__(self, base: torch.utils.data.Dataset, seed: int, task: int):
        self.base, self.seed, self.task = base, seed, task
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        pos, j = item
        # Seed only the CPU generator (the transforms draw from it): torch.manual_seed would
        # also queue a lazy CUDA seeding with a captured stack trace on every item.
        with torch.random.fork_rng(devices=[]):
            seed = mix_seed("view", self.seed, self.task, self.epoch, pos)
            torch.default_generator.manual_seed(seed)
            return self.base[j]


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack (image, label) pairs; None for an empty shard."""
    if not batch:
        return None
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    return images, labels


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    return indices[rank::world]
