"""MNIST-1D, generated locally: ten 1-D digit templates pushed through random spatial transforms and noise.

A reconstruction from the description in the paper, with its default settings; the templates and exact
transform formulas are this project's own, so samples are MNIST-1D-like, not bit-identical to the reference set.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kdflow.data.base import ArrayDataset, DatasetError, register_dataset

# One hand-drawn 1-D waveform per digit, each with a distinct shape (plateau, spike, two humps, step...).
_TEMPLATES = np.array(
    [
        [1, 3, 5, 6, 6, 6, 6, 6, 6, 5, 3, 1],  # 0: wide plateau
        [0, 0, 0, 0, 1, 6, 6, 1, 0, 0, 0, 0],  # 1: narrow spike
        [0, 2, 4, 6, 5, 3, 1, 0, 1, 2, 3, 4],  # 2: peak, dip, ramp up
        [0, 3, 5, 3, 1, 0, 1, 3, 5, 3, 0, 0],  # 3: two humps
        [0, 0, 0, 5, 5, 5, 5, -2, -2, -2, 0, 0],  # 4: step up, step down below zero
        [5, 4, 3, 2, 1, 0, 0, 2, 4, 2, 0, 0],  # 5: ramp down, late bump
        [0, -3, -5, -3, 0, 2, 4, 5, 4, 2, 1, 0],  # 6: dip then hump
        [5, 5, 5, 5, 4, 3, 2, 1, 0, -1, -2, -3],  # 7: flat top, long ramp down
        [4, 1, -2, 1, 4, 5, 4, 1, -2, 1, 4, 4],  # 8: W
        [3, 5, 6, 5, 3, 1, -1, -2, -2, -1, 0, 0],  # 9: early hump, shallow trough
    ],
    dtype=np.float64,
)


def _templates(template_len: int) -> np.ndarray:
    """Templates resampled to `template_len`, each scaled to unit RMS (their means differ on purpose)."""
    src = np.linspace(0.0, 1.0, _TEMPLATES.shape[1])
    dst = np.linspace(0.0, 1.0, template_len)
    t = np.stack([np.interp(dst, src, row) for row in _TEMPLATES])
    return t / np.sqrt((t**2).mean(axis=1, keepdims=True))


def _smooth(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth each row ('valid' convolution), rescaled back to unit variance."""
    half = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    k /= np.sqrt((k**2).sum())  # sum of k_i * unit-variance iid noise has variance sum k_i^2 = 1
    windows = np.lib.stride_tricks.sliding_window_view(noise, k.size, axis=1)
    return windows @ k


def generate_mnist1d(
    num_samples: int = 5000,
    template_len: int = 12,
    padding: tuple[int, int] = (36, 60),
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 2e-2,
    shear_scale: float = 0.75,
    final_seq_length: int = 40,
    seed: int = 42,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (x float32 N×final_seq_length, y int64 N); all samples drawn at once from one seeded generator."""
    rng = np.random.default_rng(seed)
    n, tl = num_samples, template_len
    y = rng.permutation(np.arange(n) % 10)
    t = _templates(tl)[y]

    # Pad each template with p zeros into a circular sequence of length L = tl + p, then rotate by k.
    p = rng.integers(padding[0], padding[1] + 1, size=n)
    length = tl + p
    k = rng.integers(0, max(max_translation, 1), size=n)
    lmax = int(length.max())
    pos = (np.arange(lmax)[None, :] - k[:, None]) % length[:, None]  # template index at each slot
    seq = np.where(pos < tl, np.take_along_axis(t, np.minimum(pos, tl - 1), axis=1), 0.0)

    # Horizontal scale about the centre and resampling to the final length in one linear interpolation;
    # reads wrap around, consistent with the circular translation.
    scale = 1.0 + scale_coeff * (rng.random(n) - 0.5)
    u = np.linspace(0.0, 1.0, final_seq_length)
    src = ((u[None, :] - 0.5) / scale[:, None] + 0.5) * (length[:, None] - 1)
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0
    i0 %= length[:, None]
    i1 = (i0 + 1) % length[:, None]
    x = (1 - frac) * np.take_along_axis(seq, i0, axis=1) + frac * np.take_along_axis(seq, i1, axis=1)

    # Shear: points (t, x) -> (t, x + shear * t), i.e. a random linear ramp through the centre.
    shear = shear_scale * rng.uniform(-1.0, 1.0, size=n)
    x += shear[:, None] * (u[None, :] - 0.5)

    sigma = 2.0
    half = int(np.ceil(3 * sigma))
    white = rng.standard_normal((n, final_seq_length + 2 * half))
    x += corr_noise_scale * _smooth(white, sigma)
    x += iid_noise_scale * rng.standard_normal((n, final_seq_length))
    return x.astype(np.float32), y.astype(np.int64)


@register_dataset("mnist1d")
def mnist1d(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    **settings,
) -> ArrayDataset:
    """MNIST-1D (Greydanus 2020, "Scaling down deep learning", arXiv:2011.14439), generated in memory.

    root is ignored (nothing is downloaded or cached). `settings` override the generator's other
    defaults (template_len, padding, scale_coeff, max_translation, corr_noise_scale, iid_noise_scale,
    shear_scale, final_seq_length). mean/std are taken from the generated training split.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', not {split!r}")
    try:
        x, y = generate_mnist1d(num_samples=num_samples, seed=seed, **settings)
    except TypeError as e:
        raise DatasetError(f"mnist1d: bad option ({e})") from None
    n_train = int(num_samples * train_split)
    train_x = x[:n_train]
    sl = slice(0, n_train) if split == "train" else slice(n_train, None)
    return ArrayDataset(
        name="mnist1d",
        x=torch.from_numpy(np.ascontiguousarray(x[sl])).unsqueeze(1),
        y=torch.from_numpy(np.ascontiguousarray(y[sl])),
        num_classes=10,
        mean=(float(train_x.mean()),),
        std=(float(train_x.std()),),
    )
