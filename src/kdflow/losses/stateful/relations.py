"""Criteria with trainable parameters or state, built from the tap shapes at flow build time.

Each factory returns an nn.Module whose forward takes (target tap, source tap, **context)
and returns the loss; the module belongs to the target node (its optimizer and checkpoint).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.losses import relations as relation_losses
from kdflow.losses.registry import BuildInfo, criterion
from kdflow.losses.stateful.contrastive import CRDLoss

__all__: list[str] = []  # the factories are registered criteria; CRDLoss is in contrastive.py


def _flat_dim(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _CRD(nn.Module):
    def __init__(self, crd: CRDLoss) -> None:
        super().__init__()
        self.crd = crd

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            raise ValueError("crd needs the samples' dataset indices")
        return self.crd(student.flatten(1), teacher.flatten(1), indices)


@criterion(module=True, same_shape=False, context=("indices",))
def crd(
    target_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    build: BuildInfo,
    feat_dim: int = 128,
    num_negatives: int = 16384,
    temperature: float = 0.07,
    momentum: float = 0.5,
    mode: str = "exact",
    form: str = "auto",
) -> nn.Module:
    """CRD (Tian et al. 2020): NCE between projected embeddings with momentum memory banks over the training set.

    `mode` exact / relax draws the negatives from the other classes (the training labels come with `build`);
    uniform from all samples. A test or parity check fixes the next contrast set with
    ``flow.criterion_modules[i].crd.use_contrast(contrast)``."""
    if build.num_data < 1:
        raise ValueError("crd needs the size of the training set")
    return _CRD(
        CRDLoss(
            _flat_dim(target_shape), _flat_dim(source_shape), build.num_data, feat_dim, num_negatives, temperature, momentum,
            train_labels=build.train_labels, mode=mode, form=form,
        )
    )


class _CC(nn.Module):
    def __init__(self, student_dim: int, teacher_dim: int, embed_dim: int, form: str, gamma: float, order: int) -> None:
        super().__init__()
        self.embed_s = nn.Linear(student_dim, embed_dim)
        self.embed_t = nn.Linear(teacher_dim, embed_dim)
        self.form, self.gamma, self.order = form, gamma, order

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        e_s, e_t = self.embed_s(student.flatten(1)), self.embed_t(teacher.flatten(1))
        if self.form == "rbf":
            return relation_losses.cc(e_s, e_t, self.gamma, self.order)
        return relation_losses.cc_benchmark(e_s, e_t)


@criterion(module=True, same_shape=False)
def cc(
    target_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    build: BuildInfo,
    embed_dim: int = 128,
    form: str = "benchmark",
    gamma: float = 0.4,
    order: int = 2,
) -> nn.Module:
    """CC (Peng et al. 2019) on linear `embed_dim`-d embeddings of both sides (both trained): `form`
    ``benchmark`` is `relation_losses.cc_benchmark` (the CIFAR-100 benchmark's loss), ``rbf`` the paper's
    Taylor-expanded RBF correlation congruence `relation_losses.cc` (`gamma`, `order`)."""
    if form not in ("benchmark", "rbf"):
        raise ValueError(f"form must be 'benchmark' or 'rbf', not {form!r}")
    return _CC(_flat_dim(target_shape), _flat_dim(source_shape), embed_dim, form, gamma, order)
