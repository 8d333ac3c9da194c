"""Whole-batch iteration over an in-memory split: seeded order, no per-sample Python work."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch

from kdflow.data.base import ArrayDataset


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed function of `keys` (e.g. run seed, stage, epoch)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**62)
    return torch.Generator().manual_seed(seed)


def subset(ds: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    """A seeded random subset of `n` samples (all of them when n is None or ≥ len)."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=seeded_generator(seed, 7))[:n]
    return replace(ds, x=ds.x[idx], y=ds.y[idx])


def to_device(ds: ArrayDataset, device: torch.device) -> ArrayDataset:
    return replace(ds, x=ds.x.to(device), y=ds.y.to(device))


def batches(
    ds: ArrayDataset, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, sample indices) batches; shuffled by `generator` when given. A trailing batch of one is dropped
    (batch norm cannot train on it)."""
    n = len(ds)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(ds.x.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if generator is not None and idx.numel() < 2:
            break
        yield ds.x[idx], ds.y[idx], idx


def num_batches(n: int, batch_size: int, shuffled: bool) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= (2 if shuffled else 1) else 0)
