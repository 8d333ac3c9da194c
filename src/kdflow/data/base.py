"""The in-memory dataset every loader returns, and the dataset registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ArrayDataset:
    """A whole split held as two tensors.

    x: uint8 (images, N×C×H×W) or float32 (signals, N×C×L), not yet normalised.
    y: int64 labels, shape (N,).
    mean/std: per-channel statistics used by `kdflow.data.augment.normalize`.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


class DatasetError(Exception):
    """A dataset is missing or malformed; the message says where we looked and how to get it."""


Loader = Callable[..., ArrayDataset]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return wrap


def load_dataset(name: str, split: str, root: str | None = None, **options) -> ArrayDataset:
    """Load split 'train' or 'test' of a registered dataset."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
    return DATASETS[name](split=split, root=root, **options)
