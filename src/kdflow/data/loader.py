"""Whole-batch iteration over an in-memory split: seeded order, no per-sample Python work."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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


def select(ds: ArrayDataset, idx: torch.Tensor) -> ArrayDataset:
    """The samples at `idx`. In-memory data is indexed; a lazy source (image folders) gives a view."""
    idx = idx.to(ds.y.device)
    x = ds.x[idx] if isinstance(ds.x, torch.Tensor) else ds.x.subset(idx.tolist())
    return replace(ds, x=x, y=ds.y[idx])


def subset(ds: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    """A seeded random subset of `n` samples (all of them when n is None or ≥ len)."""
    if n is None or n >= len(ds):
        return ds
    return select(ds, torch.randperm(len(ds), generator=seeded_generator(seed, 7))[:n])


def stratified_split(labels: torch.Tensor, size: float, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) sample indices: `size` (a fraction < 1, or a count) held out, spread over the classes
    in proportion to their counts (largest remainders), each class keeping at least one sample; seeded."""
    n = labels.numel()
    total = round(size * n) if size < 1 else int(size)
    if not 0 < total < n:
        raise ValueError(f"a validation split of {size:g} leaves {n - total} of {n} training samples")
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    exact = counts * total / n
    quota = exact.floor()
    rest = int(total - quota.sum())
    if rest > 0:
        quota[torch.argsort(exact - quota, descending=True, stable=True)[:rest]] += 1
    quota = torch.minimum(quota, (counts - 1).clamp(min=0)).long()
    g = seeded_generator(seed, 11)
    held = []
    for c in range(num_classes):
        members = torch.nonzero(labels.cpu() == c).flatten()
        held.append(members[torch.randperm(members.numel(), generator=g)[: int(quota[c])]])
    held_out = torch.sort(torch.cat(held)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out


def to_device(ds: ArrayDataset, device: torch.device) -> ArrayDataset:
    """Move in-memory data to `device`; a lazy source stays on disk and its batches move when loaded."""
    x = ds.x.to(device) if isinstance(ds.x, torch.Tensor) else ds.x
    return replace(ds, x=x, y=ds.y.to(device))


def load_inputs(ds: ArrayDataset, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The inputs at `idx`: indexed from memory, or decoded by a lazy source (its random crops drawn from
    `generator`)."""
    if isinstance(ds.x, torch.Tensor):
        return ds.x[idx]
    x = ds.x.load(idx.tolist(), generator)
    if ds.y.device.type == "cuda":  # from page-locked memory, the copy overlaps the device's work
        return x.pin_memory().to(ds.y.device, non_blocking=True)
    return x.to(ds.y.device)


def batches(
    ds: ArrayDataset,
    batch_size: int,
    generator: torch.Generator | None = None,
    load_generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, sample indices) batches; shuffled by `generator` when given. A trailing batch of one is dropped
    (batch norm cannot train on it). `load_generator` drives a lazy source's random crops.

    A lazy source (decoded from files) is read one batch ahead in a background thread, so decoding the
    next batch overlaps the work on this one. Batches are loaded one after another in order, so the
    crops are those of loading without prefetch, provided nothing else draws from `load_generator`
    meanwhile (give it a generator of its own)."""
    n = len(ds)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(ds.y.device)
    chunks = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    if generator is not None and chunks and chunks[-1].numel() < 2:
        chunks.pop()
    if isinstance(ds.x, torch.Tensor):
        for idx in chunks:
            yield load_inputs(ds, idx, load_generator), ds.y[idx], idx
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(load_inputs, ds, chunks[0], load_generator) if chunks else None
        for k, idx in enumerate(chunks):
            x = ahead.result()
            ahead = pool.submit(load_inputs, ds, chunks[k + 1], load_generator) if k + 1 < len(chunks) else None
            yield x, ds.y[idx], idx


def num_batches(n: int, batch_size: int, shuffled: bool) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= (2 if shuffled else 1) else 0)
