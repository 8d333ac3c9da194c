"""Replayable augmentation: every training sample has V fixed views.

View v of sample i is its crop offset and flip, drawn once from a generator seeded by the run's
seed (a table of N×V parameters). In epoch e of stage s, sample i uses view (e + o_i) mod V, with
o_i a seeded per-sample offset, so over V epochs a sample passes through all its views. Because a
view is identified by (i, v), a frozen teacher's output on it can be computed once and cached
(`kdflow.engine.teacher_cache`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdflow.data.augment import crop_at, flip_where, normalize, to_float
from kdflow.data.loader import seeded_generator


@dataclass(frozen=True)
class ViewTable:
    views: int
    padding: int
    offsets: torch.Tensor | None  # N×V×dims crop offsets, or None without cropping
    flips: torch.Tensor | None  # N×V booleans, or None without flipping
    start: torch.Tensor  # N per-sample offsets o_i into the view cycle


def make_view_table(n: int, views: int, spatial_dims: int, padding: int, flip: bool, seed: int) -> ViewTable:
    g = seeded_generator(seed, 211)
    offsets = torch.randint(0, 2 * padding + 1, (n, views, spatial_dims), generator=g) if padding else None
    flips = torch.rand(n, views, generator=g) < 0.5 if flip else None
    start = torch.randint(0, views, (n,), generator=g)
    return ViewTable(views, padding, offsets, flips, start)


def view_of(table: ViewTable, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """The view each sample uses in `epoch` (0-based within the stage)."""
    return (table.start[indices.cpu()] + epoch) % table.views


def apply_views(
    x: torch.Tensor, indices: torch.Tensor, views: torch.Tensor, table: ViewTable, mean, std
) -> torch.Tensor:
    """Samples `x` (at dataset `indices`) augmented as their views `views`, then normalised."""
    x = to_float(x)
    i, v = indices.cpu(), views.cpu()
    if table.offsets is not None:
        x = crop_at(x, table.padding, table.offsets[i, v])
    if table.flips is not None:
        x = flip_where(x, table.flips[i, v])
    return normalize(x, mean, std)
