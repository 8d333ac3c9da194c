"""Batched tensor augmentation for N×C×H×W images and N×C×L signals, with no per-sample Python loops.

Random parameters are drawn from a CPU `torch.Generator` and then moved to x's device, so one seed gives
the same augmentation on any device. Draw order (part of the contract, tests rely on it):
random_crop draws `torch.randint(0, 2 * padding + 1, (N, x.ndim - 2), generator=g)` offsets,
random_flip draws `torch.rand(N, generator=g) < 0.5`; augment_batch crops first, then flips.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]; floating tensors pass through unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if x.is_floating_point():
        return x
    raise TypeError(f"to_float expects uint8 or floating point, got {x.dtype}")


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean[c]) / std[c] per channel of an N×C×... tensor."""
    if x.ndim < 3 or len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(
            f"normalize: x of shape {tuple(x.shape)} needs N×C×... with {len(mean)} mean / {len(std)} std "
            "values matching C"
        )
    view = (1, -1) + (1,) * (x.ndim - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(view)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(view)
    return (x - m) / s


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad every spatial side by `padding`, then crop back to the original size at the given
    per-sample offsets (N×dims, each in 0..2·padding; for N×C×L only the last dim)."""
    if padding == 0:
        return x
    if x.ndim not in (3, 4):
        raise ValueError(f"crop expects N×C×L or N×C×H×W, got shape {tuple(x.shape)}")
    n, c, *spatial = x.shape
    offsets = offsets.to(x.device)
    padded = F.pad(x, (padding,) * (2 * len(spatial)))
    batch = torch.arange(n, device=x.device)
    chan = torch.arange(c, device=x.device)
    # Per-sample index along each spatial dim: offset + 0..size-1, broadcast by advanced indexing.
    idx = [offsets[:, d, None] + torch.arange(size, device=x.device) for d, size in enumerate(spatial)]
    if len(spatial) == 1:
        return padded[batch[:, None, None], chan[None, :, None], idx[0][:, None, :]]
    rows, cols = idx
    return padded[
        batch[:, None, None, None], chan[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
    ]


def flip_where(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Flip the last dim of the samples where `chosen` (N, bool) is true."""
    return torch.where(chosen.to(x.device).view((-1,) + (1,) * (x.ndim - 1)), x.flip(-1), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad every spatial side by `padding`, then crop back to the original size at a random
    per-sample offset (for N×C×L only the last dim is padded and cropped)."""
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, not {padding}")
    if padding == 0:
        return x
    if x.ndim not in (3, 4):
        raise ValueError(f"random_crop expects N×C×L or N×C×H×W, got shape {tuple(x.shape)}")
    offsets = torch.randint(0, 2 * padding + 1, (x.shape[0], x.ndim - 2), generator=generator)
    return crop_at(x, padding, offsets)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip the last dim of each sample independently with probability 0.5."""
    return flip_where(x, torch.rand(x.shape[0], generator=generator) < 0.5)


def augment_batch(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_padding: int = 0,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """to_float, then random crop and flip if asked, then per-channel normalisation."""
    x = to_float(x)
    if crop_padding or flip:
        if generator is None:
            raise ValueError("augment_batch: crop_padding/flip need a CPU torch.Generator for reproducibility")
        if crop_padding:
            x = random_crop(x, crop_padding, generator)
        if flip:
            x = random_flip(x, generator)
    return normalize(x, mean, std)
