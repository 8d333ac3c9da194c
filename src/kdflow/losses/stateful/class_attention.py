"""The CAT criterion (Guo et al. 2023, class attention transfer): class activation maps of both models,
built from each model's own classifier weight.

The transfer taps, on each side, the feature map the model pools globally before its classifier
(``avgpool:input`` in the CIFAR and ImageNet zoos, ``pool4:input`` in the VGGs); the criterion
reads the weight of each model's last ``nn.Linear`` (its classifier) at every call, so the
student's CAMs move with its classifier: the CAT term's gradient reaches the student's classifier
weight as well as its features, as in the authors' code, where the student's classifier *is* the
1×1 convolution that makes its CAMs (``conv_test``). The teacher's weight is read without gradient.
Classifier biases are not part of a CAM. The module has no parameters or buffers of its own: the
models are the flow's nodes, held in a plain tuple so they join no optimizer or state dict twice.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.losses.class_attention import class_attention_transfer
from kdflow.losses.registry import BuildInfo, criterion

__all__ = ["ClassAttentionTransfer"]


def _classifier(model: nn.Module, side: str) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the {side} ({type(model).__name__}) has no nn.Linear classifier to build its class activation maps from")
    return linears[-1]


def _check_tap(shape: tuple[int, ...], head: nn.Linear, side: str) -> None:
    if len(shape) != 3:
        raise ValueError(
            f"the {side}'s tap has shape {tuple(shape)}; tap the C×H×W map its classifier pools (e.g. avgpool:input)"
        )
    if shape[0] != head.in_features:
        raise ValueError(
            f"the {side}'s tap has {shape[0]} channels but its classifier takes {head.in_features} features; "
            "tap the map that is pooled into the classifier (e.g. avgpool:input)"
        )


class ClassAttentionTransfer(nn.Module):
    """CAT loss between the student's and the teacher's CAMs (`kdflow.losses.class_attention_transfer`),
    with the weights of the two classifiers given at construction (read at every call)."""

    def __init__(
        self, student_head: nn.Linear, teacher_head: nn.Linear, resolution: int = 2, normalize: bool = False, binarize: bool = False
    ) -> None:
        super().__init__()
        if student_head.out_features != teacher_head.out_features:
            raise ValueError(
                f"the classifiers differ in number of classes: student {student_head.out_features}, "
                f"teacher {teacher_head.out_features}"
            )
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        self._heads = (student_head, teacher_head)  # not submodules: they belong to the nodes
        self.resolution, self.normalize, self.binarize = resolution, bool(normalize), bool(binarize)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        student_head, teacher_head = self._heads
        return class_attention_transfer(
            student_feature, teacher_feature, student_head.weight, teacher_head.weight.detach(),
            self.resolution, self.normalize, self.binarize,
        )

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, normalize={self.normalize}, binarize={self.binarize}"


@criterion(module=True, same_shape=False)
def cat(
    target_shape: tuple[int, ...],
    source_shape: tuple[int, ...],
    build: BuildInfo,
    resolution: int = 2,
    normalize: bool = False,
    binarize: bool = False,
) -> nn.Module:
    """CAT (Guo et al. 2023): MSE between the two models' class activation maps, each the model's classifier
    weight applied to the tapped map, average-pooled to `resolution`² and, with `normalize`, L2-normalised per
    class map; `binarize` thresholds the teacher's maps at their mean absolute value (the paper's CAT study)."""
    if build.source_model is None:
        raise ValueError("cat reads the teacher's classifier: the source cannot be fused from several nodes")
    student_head, teacher_head = _classifier(build.target_model, "student"), _classifier(build.source_model, "teacher")
    _check_tap(tuple(target_shape), student_head, "student")
    _check_tap(tuple(source_shape), teacher_head, "teacher")
    return ClassAttentionTransfer(student_head, teacher_head, resolution, normalize, binarize)
