"""Class attention transfer: Guo, Yan, Li and Lin 2023, "Class Attention Transfer Based Knowledge
Distillation" (CVPR).

A class activation map (CAM, Zhou et al. 2016) of class k is the classifier's weight row for k
applied at every position of the feature map that the network pools globally before its
classifier:

    CAM_k(F)[h, w] = Σ_c W[k, c] · F[c, h, w]          (B×C×H×W, K×C  →  B×K×H×W)

so that global average pooling of CAM_k is the class-k logit without its bias. CAT-KD transfers
the teacher's CAMs to the student: both are average-pooled to r×r (`adaptive_avg_pool2d`), each
class map is optionally L2-normalised over its r² positions, and the loss is the mean squared
difference over all B·K·r² entries (``F.mse_loss``).

Pure functions of tensors; the criterion that reads both models' classifier weights is
`kdflow.losses.stateful.class_attention` (criterion ``cat``). Everything is computed in the
inputs' dtype, raised to float32 for half precisions (`kdflow.losses.precision`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdflow.losses.precision import compute_dtype

__all__ = ["binarize_cams", "cat_loss", "class_activation_maps", "class_attention_transfer"]


def _check_feature(feature: torch.Tensor, what: str) -> None:
    if feature.dim() != 4:
        raise ValueError(f"{what}: expected a B×C×H×W feature map, got shape {tuple(feature.shape)}")


def _check_weight(feature: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a K×C classifier weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] != feature.shape[1]:
        raise ValueError(
            f"{what}: the classifier takes {weight.shape[1]} features but the feature map has {feature.shape[1]} channels"
        )


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")


def class_activation_maps(feature: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAM_k = Σ_c W[k, c]·F[c] at every position: a B×K×H×W tensor from a B×C×H×W feature map and
    the K×C weight of the linear classifier that reads its global average (bias not included).
    This is the 1×1 convolution the CAT-KD code builds from the classifier (``conv_test``)."""
    _check_feature(feature, "class_activation_maps")
    _check_weight(feature, weight, "class_activation_maps")
    x = compute_dtype(feature)
    return torch.einsum("kc,bchw->bkhw", weight.to(x.dtype), x)


def binarize_cams(cams: torch.Tensor) -> torch.Tensor:
    """The CAT paper's binarised CAMs: 1 where a class map exceeds its own mean absolute value over
    the positions (``IF_BINARIZE`` in the authors' code), else 0. No gradient flows through it."""
    _check_feature(cams, "binarize_cams")
    x = compute_dtype(cams)
    threshold = x.abs().mean(dim=(2, 3), keepdim=True)
    return (x > threshold).to(x.dtype)


def cat_loss(student_cams: torch.Tensor, teacher_cams: torch.Tensor, resolution: int = 2, normalize: bool = False) -> torch.Tensor:
    """Mean squared difference of the two models' CAMs (B×K×H×W each, spatial sizes may differ),
    both average-pooled to `resolution`×`resolution`; with `normalize` each class map is first divided
    by its L2 norm over those positions (``F.normalize``, eps 1e-12). Mean over B·K·r² entries."""
    _check_feature(student_cams, "cat_loss: student_cams")
    _check_feature(teacher_cams, "cat_loss: teacher_cams")
    _check_resolution(resolution)
    if student_cams.shape[:2] != teacher_cams.shape[:2]:
        raise ValueError(
            f"cat_loss: the CAMs differ in batch size or number of classes: student {tuple(student_cams.shape[:2])}, "
            f"teacher {tuple(teacher_cams.shape[:2])}"
        )
    s = F.adaptive_avg_pool2d(compute_dtype(student_cams), resolution)
    t = F.adaptive_avg_pool2d(compute_dtype(teacher_cams), resolution).to(s.dtype)
    if normalize:
        s, t = F.normalize(s, p=2.0, dim=(2, 3)), F.normalize(t, p=2.0, dim=(2, 3))
    return F.mse_loss(s, t)


def class_attention_transfer(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    resolution: int = 2,
    normalize: bool = False,
    binarize: bool = False,
) -> torch.Tensor:
    """CAT loss from the two feature maps and the two classifier weights:
    ``cat_loss(CAM(F_s, W_s), CAM(F_t, W_t), resolution, normalize)``, with the teacher's CAMs binarised
    first when `binarize` is set.

    The CAM is linear in the feature map and average pooling acts on each channel alone, so
    pool(CAM(F, W)) = CAM(pool(F), W): the feature maps are pooled to r×r before the classifier weight
    is applied (the same loss, exactly in real arithmetic, at r²/(H·W) of the cost). Binarisation
    needs the teacher's full-resolution CAMs and computes them."""
    _check_feature(student_feature, "class_attention_transfer: student_feature")
    _check_feature(teacher_feature, "class_attention_transfer: teacher_feature")
    _check_weight(student_feature, student_weight, "class_attention_transfer: student")
    _check_weight(teacher_feature, teacher_weight, "class_attention_transfer: teacher")
    _check_resolution(resolution)
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(f"class_attention_transfer: batch sizes differ: {student_feature.shape[0]} and {teacher_feature.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"class_attention_transfer: the classifiers differ in number of classes: student {student_weight.shape[0]}, "
            f"teacher {teacher_weight.shape[0]}"
        )
    s = class_activation_maps(F.adaptive_avg_pool2d(compute_dtype(student_feature), resolution), student_weight)
    if binarize:
        t = binarize_cams(class_activation_maps(teacher_feature, teacher_weight))
    else:
        t = class_activation_maps(F.adaptive_avg_pool2d(compute_dtype(teacher_feature), resolution), teacher_weight)
    return cat_loss(s, t, resolution, normalize)
