"""A tiny learnable dataset for tests: one fixed random pattern per class plus Gaussian noise."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from kdflow.data.base import ArrayDataset, DatasetError, register_dataset


def _draw(
    patterns: np.ndarray, n: int, image: bool, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes, shape = patterns.shape[0], patterns.shape[1:]
    y = rng.permutation(np.arange(n) % num_classes)
    if image:
        x01 = np.clip(patterns[y] + 0.15 * rng.standard_normal((n, *shape)), 0.0, 1.0)
        x = torch.from_numpy(np.round(x01 * 255).astype(np.uint8))
    else:
        x = torch.from_numpy((patterns[y] + rng.standard_normal((n, *shape))).astype(np.float32))
    return x, torch.from_numpy(y.astype(np.int64))


@register_dataset("synthetic")
def synthetic(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    num_samples: int = 512,
    num_classes: int = 4,
    shape: Sequence[int] = (1, 8, 8),
    seed: int = 0,
) -> ArrayDataset:
    """Class-mean patterns plus noise (a Gaussian-mixture toy task, no source paper); root is ignored.

    Train has `num_samples` samples, test a quarter of that; both share the class patterns of `seed`.
    Image shapes (C, H, W) give uint8 x, signal shapes (C, L) give float32 x, as the real loaders do.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DatasetError(f"synthetic: shape must be (C, L) or (C, H, W), not {shape}")
    if num_classes < 2:
        raise DatasetError(f"synthetic: num_classes must be at least 2, not {num_classes}")
    image = len(shape) == 3

    rng = np.random.default_rng(seed)
    if image:
        # Means in [0.2, 0.8] on the 0..1 scale; the noise keeps samples mostly inside [0, 1].
        patterns = rng.uniform(0.2, 0.8, size=(num_classes, *shape))
    else:
        patterns = rng.standard_normal((num_classes, *shape))
    # Train and test draw from separate streams; stats always come from the training split.
    train_x, train_y = _draw(patterns, num_samples, image, np.random.default_rng([seed, 1]))
    if split == "train":
        x, y = train_x, train_y
    else:
        x, y = _draw(patterns, max(num_samples // 4, 1), image, np.random.default_rng([seed, 2]))
    stats = train_x.float() / 255 if image else train_x
    dims = [0, *range(2, stats.ndim)]
    return ArrayDataset(
        name="synthetic",
        x=x,
        y=y,
        num_classes=num_classes,
        mean=tuple(float(v) for v in stats.mean(dim=dims)),
        std=tuple(float(v) for v in stats.std(dim=dims, correction=0)),
    )
