"""The order in which a loader visits samples: one rule for every loader."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["epoch_generator", "epoch_order"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch: a pure function of ``(seed, epoch)``, so resumed runs
    and distributed ranks draw the same order and augmentation."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(n: int, gen: torch.Generator, shuffle: bool, rank: int = 0,
                world_size: int = 1) -> Tensor:
    """Sample indices of one epoch: a permutation from ``gen`` (or ``0..n-1``), then rank
    ``r`` of ``w`` takes every ``w``-th one (the tail dropped so ranks see equal counts)."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[: n - n % world_size][rank::world_size]
    return order
