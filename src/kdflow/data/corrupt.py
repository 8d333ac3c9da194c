"""Corruptions of the training split for the robustness study: label noise and class imbalance.

Each is a seeded function of the labels, so the same seed gives the same corruption; the test
split is never corrupted. Definitions follow ../shared/methods.md, with one deliberate choice:
noise flips exactly round(η·N) labels (chosen uniformly without replacement) rather than each
label independently with probability η, so a run's realised noise rate is the requested one.
"""
from __future__ import annotations

import torch

from kdflow.data.loader import seeded_generator

# CIFAR-10 asymmetric noise: truck→automobile, bird→airplane, deer→horse, cat↔dog
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def _pick(n: int, count: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[:count]


def symmetric_noise(y: torch.Tensor, num_classes: int, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """round(rate·N) labels replaced by one of the other C−1 classes, uniformly. Returns (labels, flipped mask)."""
    g = seeded_generator(seed, 101)
    idx = _pick(len(y), round(rate * len(y)), g)
    offset = torch.randint(1, num_classes, (len(idx),), generator=g)  # never 0: never the true class
    noisy = y.clone()
    noisy[idx] = (y[idx] + offset) % num_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


def pairflip_noise(y: torch.Tensor, num_classes: int, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """round(rate·N) labels y replaced by (y + 1) mod C."""
    idx = _pick(len(y), round(rate * len(y)), seeded_generator(seed, 102))
    noisy = y.clone()
    noisy[idx] = (y[idx] + 1) % num_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


def asymmetric_cifar10_noise(y: torch.Tensor, num_classes: int, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In each source class of the CIFAR-10 mapping, round(rate·n_c) labels moved to the mapped class."""
    if num_classes != 10:
        raise ValueError("the asymmetric CIFAR-10 mapping needs 10 classes")
    g = seeded_generator(seed, 103)
    noisy = y.clone()
    mask = torch.zeros(len(y), dtype=torch.bool)
    for src, dst in CIFAR10_ASYMMETRIC.items():
        members = torch.nonzero(y == src).flatten()
        chosen = members[_pick(len(members), round(rate * len(members)), g)]
        noisy[chosen] = dst
        mask[chosen] = True
    return noisy, mask


NOISE = {"symmetric": symmetric_noise, "pairflip": pairflip_noise, "asymmetric_cifar10": asymmetric_cifar10_noise}


def imbalance_counts(counts: list[int], kind: str, ratio: float) -> list[int]:
    """Per-class sizes after imbalance: exponential n_i = n_max·ρ^(−i/(C−1)); step: the second half of the
    classes cut to n_max/ρ. Never more than a class has."""
    c = len(counts)
    n_max = max(counts)
    if kind == "exponential":
        wanted = [int(n_max * ratio ** (-i / max(c - 1, 1))) for i in range(c)]
    elif kind == "step":
        wanted = [n_max if i < c - c // 2 else int(n_max / ratio) for i in range(c)]
    else:
        raise ValueError(f"unknown imbalance {kind!r}; known: exponential, step")
    return [max(1, min(w, n)) for w, n in zip(wanted, counts)]


def imbalance_indices(y: torch.Tensor, num_classes: int, kind: str, ratio: float, seed: int) -> torch.Tensor:
    """Indices of a long-tailed subset: for each class i, a seeded random n_i of its samples (sorted)."""
    g = seeded_generator(seed, 104)
    counts = [int((y == k).sum()) for k in range(num_classes)]
    keep = []
    for k, n in enumerate(imbalance_counts(counts, kind, ratio)):
        members = torch.nonzero(y == k).flatten()
        keep.append(members[_pick(len(members), n, g)])
    return torch.cat(keep).sort().values
