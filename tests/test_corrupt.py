"""Corruptions of the training split (exact rates and counts, seeded) and the per-class / calibration metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import SYNTH
from kdflow.data import ArrayDataset
from kdflow.data.corrupt import (
    asymmetric_cifar10_noise,
    imbalance_counts,
    imbalance_indices,
    pairflip_noise,
    symmetric_noise,
)
from kdflow.engine import evaluate, train
from kdflow.methods.recipe import resolve


def labels(n_per_class: int = 100, c: int = 10) -> torch.Tensor:
    return torch.arange(c).repeat_interleave(n_per_class)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6])
def test_symmetric_noise_exact_rate_seeded(rate: float) -> None:
    y = labels()
    noisy, mask = symmetric_noise(y, 10, rate, seed=3)
    assert int(mask.sum()) == round(rate * len(y)) == int((noisy != y).sum())  # every flip changes the label
    assert torch.equal(noisy[~mask], y[~mask])
    again, _ = symmetric_noise(y, 10, rate, seed=3)
    assert torch.equal(again, noisy)
    if rate:
        other, _ = symmetric_noise(y, 10, rate, seed=4)
        assert not torch.equal(other, noisy)
        offsets = ((noisy[mask] - y[mask]) % 10).tolist()
        assert set(offsets) == set(range(1, 10))  # all other classes are used


def test_pairflip_and_asymmetric_noise() -> None:
    y = labels()
    noisy, mask = pairflip_noise(y, 10, 0.3, seed=0)
    assert int(mask.sum()) == 300 and torch.equal(noisy[mask], (y[mask] + 1) % 10)
    noisy, mask = asymmetric_cifar10_noise(y, 10, 0.4, seed=0)
    moved = {(int(a), int(b)) for a, b in zip(y[mask], noisy[mask])}
    assert moved == {(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)}
    assert all(int(((y == k) & mask).sum()) == 40 for k in (9, 2, 4, 3, 5))
    assert int(mask.sum()) == 200


def test_imbalance_counts_and_indices() -> None:
    assert imbalance_counts([500] * 10, "exponential", 100) == [int(500 * 100 ** (-i / 9)) for i in range(10)]
    assert imbalance_counts([500] * 10, "step", 10) == [500] * 5 + [50] * 5
    y = labels(50, 4)
    keep = imbalance_indices(y, 4, "exponential", 10, seed=1)
    counts = torch.bincount(y[keep], minlength=4).tolist()
    assert counts == [50, int(50 * 10 ** (-1 / 3)), int(50 * 10 ** (-2 / 3)), 5]
    assert torch.equal(keep, imbalance_indices(y, 4, "exponential", 10, seed=1))


def test_engine_corrupts_the_training_split_only(tmp_path: Path) -> None:
    raw = {"data": {**SYNTH, "noise": {"rate": 0.25, "seed": 1}, "imbalance": {"kind": "step", "ratio": 4}},
           "nodes": {"s": {"arch": "mlp"}}, "supervise": {"s": 1.0}, "train": {"epochs": 1, "batch_size": 16}}
    train(resolve(raw), tmp_path / "run", progress=False, log=lambda s: None)
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    # synthetic: 96 samples, 4 classes of 24; step imbalance cuts classes 2 and 3 to 6
    assert record["train_class_counts"] == [24, 24, 6, 6]
    assert sum(record["train_noisy_class_counts"]) == 60 and record["train_noisy_class_counts"] != [24, 24, 6, 6]
    assert record["noise"]["flipped"] == round(0.25 * 60) and record["noise"]["realised_rate"] == pytest.approx(0.25)
    assert record["test_class_counts"] == [6, 6, 6, 6]  # the test split stays balanced
    saved = torch.load(tmp_path / "run" / "corruption.pt", weights_only=True)
    assert int(saved["noise_mask"].sum()) == 15 and len(saved["clean_labels"]) == 60


def test_per_class_accuracy_and_ece_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ds = ArrayDataset("t", x, y, 3, (0.0,), (1.0,))
    ev = evaluate(model, ds, batch_size=16)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1).double().numpy()
    pred, conf, yn = p.argmax(1), p.max(1), y.numpy()
    per_class = [100 * np.mean(pred[yn == k] == k) for k in range(3)]
    assert ev["per_class_top1"] == pytest.approx(per_class, abs=1e-3)
    ece = 0.0
    for b in range(15):
        sel = (np.minimum((conf * 15).astype(int), 14)) == b
        if sel.any():
            ece += sel.mean() * abs(np.mean(pred[sel] == yn[sel]) - conf[sel].mean())
    assert ev["ece"] == pytest.approx(ece, abs=1e-6)
    assert ev["test_top1"] == pytest.approx(100 * np.mean(pred == yn))
