"""CRD's contrast sets (Tian et al. 2020; RepDistiller's CIFAR100InstanceSample): exact / relax / uniform."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdflow.checkpoint import model_file, save_atomic
from kdflow.methods.recipe import resolve
from kdflow.flow.graph import Flow
from kdflow.losses import CRDLoss
from kdflow.models import build_model


def make(labels: torch.Tensor, k: int, mode: str = "exact") -> CRDLoss:
    return CRDLoss(3, 3, num_data=labels.numel(), feat_dim=4, num_negatives=k, train_labels=labels, mode=mode)


def test_exact_positive_is_the_sample_and_negatives_other_classes_without_replacement() -> None:
    labels = torch.arange(60) % 5  # 12 per class, 48 negatives each
    crd = make(labels, k=40)
    idx = torch.tensor([0, 7, 13, 59])
    c = crd.sample_contrast(idx, torch.Generator().manual_seed(0))
    assert c.shape == (4, 41)
    assert torch.equal(c[:, 0], idx)
    assert not (labels[c[:, 1:]] == labels[idx].unsqueeze(1)).any()
    assert all(row.unique().numel() == 40 for row in c[:, 1:])  # no repeats: 40 ≤ 48


def test_with_replacement_when_a_class_has_too_few_negatives() -> None:
    labels = torch.arange(20) % 2  # 10 negatives per sample
    c = make(labels, k=50).sample_contrast(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(1))
    assert not (labels[c[:, 1:]] == labels[c[:, :1]]).any()
    assert all(set(row.tolist()) == set(torch.nonzero(labels != labels[i]).flatten().tolist())
               for i, row in zip([0, 1, 2], c[:, 1:]))  # 50 draws of 10: every negative is hit


def test_per_sample_replacement_with_unbalanced_classes() -> None:
    """RepDistiller decides replacement per sample: class 0 (3 samples) has 17 negatives, class 1 (17) has 3."""
    labels = torch.tensor([0] * 3 + [1] * 17)
    idx = torch.tensor([0, 5])
    c = make(labels, k=5).sample_contrast(idx, torch.Generator().manual_seed(2))
    assert (labels[c[0, 1:]] == 1).all() and c[0, 1:].unique().numel() == 5  # without replacement
    assert (labels[c[1, 1:]] == 0).all() and c[1, 1:].unique().numel() <= 3  # with replacement


def test_negatives_are_uniform_over_the_other_classes() -> None:
    labels = torch.arange(40) % 4
    crd = make(labels, k=10)
    idx = torch.zeros(2000, dtype=torch.long)  # class 0
    counts = torch.bincount(crd.sample_contrast(idx, torch.Generator().manual_seed(3))[:, 1:].flatten(), minlength=40)
    assert counts[labels == 0].sum() == 0
    expected = 2000 * 10 / 30
    assert (counts[labels != 0].float() / expected - 1).abs().max() < 0.15


def test_relax_positive_is_a_sample_of_the_same_class() -> None:
    labels = torch.arange(50) % 5
    idx = torch.tensor([3] * 200)
    c = make(labels, k=4, mode="relax").sample_contrast(idx, torch.Generator().manual_seed(4))
    assert (labels[c[:, 0]] == 3).all()
    assert c[:, 0].unique().numel() == 10  # all ten samples of class 3 come up
    assert not (labels[c[:, 1:]] == 3).any()


def test_uniform_needs_no_labels_and_draws_from_all() -> None:
    crd = CRDLoss(3, 3, num_data=30, feat_dim=4, num_negatives=8, mode="uniform")
    c = crd.sample_contrast(torch.zeros(500, dtype=torch.long), torch.Generator().manual_seed(5))
    assert c[:, 1:].unique().numel() == 30


def test_labels_reach_the_criterion_through_the_flow(tmp_path: Path) -> None:
    ckpt = tmp_path / "teacher.pt"
    save_atomic(model_file("convnet_s", {}, 4, (1, 8, 8), build_model("convnet_s", 4, (1, 8, 8)).state_dict()), ckpt)
    raw = {
        "name": "crd-labels", "data": {"name": "synthetic"}, "train": {"epochs": 1, "batch_size": 8},
        "nodes": {"teacher": {"arch": "convnet_s", "checkpoint": str(ckpt)},
                  "student": {"arch": "convnet_s"}},
        "method": {"name": "crd", "num_negatives": 8},
    }
    labels = torch.arange(40) % 4
    flow = Flow(resolve(raw), 4, (1, 8, 8), torch.randn(2, 1, 8, 8), num_data=40, train_labels=labels)
    crd = flow.criterion_modules["0"].crd
    assert crd.mode == "exact" and torch.equal(crd.labels, labels)
    with pytest.raises(Exception, match="labels"):
        Flow(resolve(raw), 4, (1, 8, 8), torch.randn(2, 1, 8, 8), num_data=40)
