"""Wide ResNets of the CRD/RepDistiller benchmark (Zagoruyko & Komodakis 2016): ``wrn_D_W``.

Registered names: ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``. A WRN-D-W has a bare
3×3 conv stem of 16 channels and three stages of (D - 4) / 6 pre-activation basic blocks
(BN-ReLU-conv, BN-ReLU-conv) of widths 16·W, 32·W, 64·W (the last two halve the resolution),
then BN-ReLU, global average pool and ``fc``. Parameter names follow the benchmark
(``conv1``, ``block1.layer.0.bn1``, ``convShortcut``, ``bn1``, ``fc``), so its checkpoints load.

Being pre-activation, a stage's residual output has no ReLU of its own: the next stage's first
block normalises and activates it (the final ``bn1``/``relu`` for the last stage). The taps
follow the benchmark's feature list (RepDistiller and mdistiller ``models/.../wrn.py``, ``forward``:
``[f0, f1, f2, f3]`` raw, and the pre-activation list ``bn(f_k)`` of ``get_bn_before_relu``):

* ``stem``: the stem conv's output (f0).
* ``stage1``..``stage3``: the stage's raw residual output (``block1``..``block3``, f1..f3).
* ``stage1_pre``..``stage3_pre``: the batch norm that the next stage (or the head) applies to it
  (``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``), the benchmark's pre-activation feature.
* ``stage1_act``..``stage3_act``: ReLU of that (``block2.layer.0.relu1``, ``block3.layer.0.relu1``,
  ``relu``), the activation the next stage consumes; ``relu(stageK_pre) == stageK_act``.
* ``embedding`` (generic): the input of ``fc``, the pooled ``stage3``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdflow.models.cifar_resnet import _check_image, init_weights
from kdflow.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3(stride)-BN-ReLU-conv3×3, plus an identity shortcut, or a
    1×1 conv shortcut from the activated input when the width or resolution changes.

    ``relu1`` is not in-place when ``tapped_bn1`` (its BN output is a published tap).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0, tapped_bn1: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=not tapped_bn1)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.drop(out))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One stage: `n` wide blocks in ``layer``; the first one may change width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float, tap_first: bool) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate, tap_first and i == 0)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen` for CIFAR (see the module docstring)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate, tap_first=False)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate, tap_first=True)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate, tap_first=True)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.tap_names = {
            "stem": "conv1",
            "stage1": "block1",
            "stage1_pre": "block2.layer.0.bn1",
            "stage1_act": "block2.layer.0.relu1",
            "stage2": "block2",
            "stage2_pre": "block3.layer.0.bn1",
            "stage2_act": "block3.layer.0.relu1",
            "stage3": "block3",
            "stage3_pre": "bn1",
            "stage3_act": "relu",
        }
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _register_wrn(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"

    def build(num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32), drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes, _check_image(input_shape), drop_rate)

    build.__name__ = name
    build.__doc__ = f"Wide ResNet-{depth}-{widen} for CIFAR (stage widths {16 * widen}, {32 * widen}, {64 * widen})."
    register_model(name)(build)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen)
